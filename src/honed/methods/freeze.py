"""Freeze the embeddings and the lowest N transformer layers; the rest trains."""

from torch import nn

from ..errors import RecipeError


def find_layers(model: nn.Module, head_name: str | None = None) -> tuple[str, list[nn.Module]] | tuple[None, None]:
    """The model's stack of blocks: the ModuleList holding the most parameters; for models
    without one (a tabular MLP), its linear layers outside the head, bottom first."""
    best, best_size = (None, None), 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = (name, list(module)), size
    if best[1] is None and head_name is not None:
        linears = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != head_name]
        if linears:
            return "linear layers", linears
    return best


def embedding_module(model: nn.Module) -> nn.Module | None:
    """BERT-style models group word, position and type embeddings in one `*embeddings` module;
    time-series models embed patches with a linear layer (PatchTST's `embedder`, PatchTSMixer's `patcher`)."""
    for name, module in model.named_modules():
        if name.endswith("embeddings") and any(isinstance(m, nn.Embedding) for m in module.modules()):
            return module
        if name.endswith(("encoder.embedder", "encoder.patcher")):
            return module
    get = getattr(model, "get_input_embeddings", None)
    if get is not None:
        try:
            return get()
        except NotImplementedError:  # transformers raises this for models without token embeddings
            return None
    return next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)


def apply(model: nn.Module, bundle, recipe) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    _, layers = find_layers(model, bundle.head_name)
    depth = len(layers) if layers is not None else 0
    wanted = recipe.freeze.layers
    n = depth // 2 if wanted == "half" else int(wanted)
    if n > depth:
        raise RecipeError(f"freeze.layers: the model has {depth} layers; got {n}")
    embeddings = embedding_module(model)
    if embeddings is not None:
        for p in embeddings.parameters():
            p.requires_grad_(False)
    for block in list(layers or [])[:n]:
        for p in block.parameters():
            p.requires_grad_(False)
    for p in bundle.head().parameters():
        p.requires_grad_(True)
    return model
