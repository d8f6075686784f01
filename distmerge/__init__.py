"""distmerge: merge many PEFT LoRA adapters into one, straight from their files, locally or on Ray.

    import distmerge
    result = distmerge.merge("configs/quickstart.yaml", ["merge.method=ties", "merge.density=0.5"])
    print(result.path, result.rank)
"""

__version__ = "0.1.0"

from distmerge.config import MergeConfig, load_config  # noqa: E402
from distmerge.driver import MergeResult, merge, plan  # noqa: E402
from distmerge.errors import DistmergeError  # noqa: E402

__all__ = ["DistmergeError", "MergeConfig", "MergeResult", "__version__", "load_config", "merge", "plan"]
