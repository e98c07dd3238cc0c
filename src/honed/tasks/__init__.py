"""Tasks, as a literal table: each row is a `Task` (tasks/base.py) built in tasks/<task>/task.py.

The run calls only the rows' fields, so a new task is a new folder and a new row here, not a
branch in the run (docs/adding-a-task.md).
"""

from .base import Task
from .causal_lm.task import TASK as CAUSAL_LM
from .chat.task import TASK as CHAT
from .forecasting.task import TASK as FORECASTING
from .image.task import TASK as IMAGE_CLASSIFICATION
from .preference.task import TASK as PREFERENCE
from .tabular.task import CLASSIFICATION as TABULAR_CLASSIFICATION
from .tabular.task import REGRESSION as TABULAR_REGRESSION
from .text.task import TASK as TEXT_CLASSIFICATION

TASKS: dict[str, Task] = {
    "text-classification": TEXT_CLASSIFICATION,
    "image-classification": IMAGE_CLASSIFICATION,
    "tabular-classification": TABULAR_CLASSIFICATION,
    "tabular-regression": TABULAR_REGRESSION,
    "forecasting": FORECASTING,
    "chat": CHAT,
    "preference": PREFERENCE,
    "causal-lm": CAUSAL_LM,
}
