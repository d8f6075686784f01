"""What an output carries to its readers: a model card (card.py), imported only when an output is written."""
