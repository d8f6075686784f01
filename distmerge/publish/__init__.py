"""What an output carries to its readers: a model card (card.py), and an upload to the Hub (hub.py).

Both are kept out of a merge's hot path: card.py is imported when an output is written, hub.py only
when one is pushed.
"""
