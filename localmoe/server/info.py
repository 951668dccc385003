"""Facts about a loaded model for /props, /api/tags and /api/show (read once, at load)."""
from __future__ import annotations


def read_facts(model, template_ok: bool) -> dict:
    from gguf import LlamaFileType
    a, f = model.args, model.file
    ft = f.metadata.get("general.file_type")
    quant = LlamaFileType(ft).name.removeprefix("MOSTLY_") if ft in LlamaFileType._value2member_map_ else None
    plan = getattr(model, "plan", None)
    return {"arch": a.arch, "n_params": int(sum(t.n_elements for t in f.tensors.values())), "quant": quant,
            "n_layer": a.n_layer, "n_expert": a.n_expert, "n_expert_used": a.n_expert_used,
            "n_ctx": model.n_ctx, "n_ctx_train": a.n_ctx_train, "n_embd": a.n_embd,
            "ram_budget": getattr(plan, "budget", None) if plan is not None else None,
            "has_chat_template": bool(f.metadata.get("tokenizer.chat_template")) and template_ok,
            "name": f.metadata.get("general.name")}


def model_facts(engine) -> dict | None:
    L = engine.loaded
    return L.facts if L is not None else None
