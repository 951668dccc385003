"""Memory planner: run MoE models larger than the RAM budget by keeping hot
experts resident and streaming cold ones from the GGUF file.

budget.py  sizes ("6G")            plan.py     footprint, slots per layer, minimum
policy.py  LRU / LFU-with-decay    cache.py    expert slots in a tier buffer
disk.py    pread + FADV_DONTNEED   tiers.py    RAM tier (GPU tier: a later issue)
store.py   OffloadedExpertStore    prefetch.py next-layer router guess, I/O thread
stats.py   --stats / profiles      offload.py  Model wiring
"""
from .budget import format_size, parse_size
from .offload import offload, prefer_passive_omp
from .plan import BudgetTooSmallError, Footprint, Plan, footprint, make_plan, plan_for
from .policy import POLICIES
from .stats import format_stats, load_profile, save_stats
from .store import OffloadedExpertStore

DEFAULT_POLICY = "lfu"

__all__ = ["BudgetTooSmallError", "DEFAULT_POLICY", "Footprint", "OffloadedExpertStore", "POLICIES", "Plan",
           "footprint", "format_size", "format_stats", "load_profile", "make_plan", "offload", "parse_size",
           "plan_for", "prefer_passive_omp", "save_stats"]
