"""Cache replacement policies for one memory tier (see ``base.ReplacementPolicy``)."""

from wicore.memory.policies.a2cr import A2CRPolicy
from wicore.memory.policies.arc import ARCPolicy
from wicore.memory.policies.base import AccessOutcome, Key, ReplacementPolicy
from wicore.memory.policies.belady import BeladyPolicy
from wicore.memory.policies.lfu import LFUPolicy
from wicore.memory.policies.lrfu import LRFUPolicy
from wicore.memory.policies.lru import LRUPolicy

POLICY_CLASSES: dict[str, type[ReplacementPolicy]] = {
    cls.name: cls for cls in (LRUPolicy, LFUPolicy, ARCPolicy, LRFUPolicy, A2CRPolicy, BeladyPolicy)
}

__all__ = ["POLICY_CLASSES", "A2CRPolicy", "ARCPolicy", "AccessOutcome", "BeladyPolicy", "Key",
           "LFUPolicy", "LRFUPolicy", "LRUPolicy", "ReplacementPolicy"]
