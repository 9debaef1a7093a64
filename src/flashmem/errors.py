"""Errors flashmem raises. Every one derives from `FlashmemError` and says what failed, the numbers
in human units, and the fix."""


class FlashmemError(Exception):
    """Base class of every error flashmem raises on purpose."""


class BudgetTooSmall(FlashmemError):
    """The memory budget cannot hold what one op needs at once. Raised before any streamed call."""

    def __init__(self, message: str, *, op: str, need_bytes: int, budget_bytes: int):
        super().__init__(message)
        self.op = op
        self.need_bytes = need_bytes
        self.budget_bytes = budget_bytes


class BadBudget(FlashmemError, ValueError):
    """A budget that does not parse or is not positive."""


class BadModelFolder(FlashmemError):
    """A model folder that is missing files, holds unreadable weights or does not match its config."""


class CorruptWeights(BadModelFolder):
    """A weight's bytes, read again while streaming, differ from what was first read from its file."""


class DeviceUnavailable(FlashmemError):
    """The requested device is not there (no CUDA GPU, for instance)."""


class TraceMismatch(FlashmemError):
    """The model ran ops in another order than the traced one, so the plan does not apply."""


class ControlFlowWarning(UserWarning):
    """A call ran its ops in another order than the traced one (a data-dependent branch, expert routing):
    flashmem completed it correctly by loading the rest of its weights on demand, without prefetching."""


class GraphWarning(UserWarning):
    """With cuda_graphs=True, an input runs eagerly: its capture failed, or its graph would not fit the
    budget, or its inputs or outputs hold objects a replay cannot refresh (StreamedModel.graph_refusals)."""


class PlanInvalid(FlashmemError):
    """A plan failed the independent checker; it is never executed."""
