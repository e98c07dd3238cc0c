"""The guards' pure math: forgetting, data sufficiency, bias, and the shared result shape."""
