from .perplexity import PerplexityResult, perplexity
from .sparsity import SparsityMonitor, summarize_by_type

__all__ = ["PerplexityResult", "perplexity", "SparsityMonitor", "summarize_by_type"]
