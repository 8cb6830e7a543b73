"""cvrecipe: data → sanity checks → train → evaluate → tune → export → serve → monitor."""
__version__ = "0.1.0"
