from distmerge.cli import entry

entry()
