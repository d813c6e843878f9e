"""Per-GPU memory of the four stages, computed from a model config rather than guessed (issue 12).

    python bench/memory_plan.py --model llama-7b --world_size 8 --fsdp --stage ppo_lag --gpu_gib 80
    python bench/memory_plan.py --model data/tiny-llama/config.json --stage sft --no_bf16
    python bench/memory_plan.py --paper_table      # DDP vs FSDP on 8 x 80 GiB at 1B, 7B, 13B

`memory_plan(config, world_size, fsdp, stage, ...)` returns the expected bytes on one GPU (one rank) of:
- trained weights (fp32 masters, 4 bytes), gradients (fp32, 4), AdamW states (two fp32 moments, 8): 16 bytes per
  trained parameter. Under FSDP every parameter is cut on dim 0 as torch.chunk cuts it: ceil(d0 / N) rows per rank,
  fewer (or none) on the last ranks; the figure is exact per rank (`rank`), and rank 0 holds the most.
- frozen models (reference, reward, cost): bf16 on CUDA (2 bytes), fp32 on CPU; sharded like the rest under FSDP.
- DDP's all-reduce buckets: DDP (world size > 1, gradient_as_bucket_view off, the default) keeps a second fp32 copy
  of the gradients in its buckets.
- activations of the largest backward, with and without gradient checkpointing (see `layer_activation_bytes`).
- bf16 weight copies while learning: under DDP, autocast caches a bf16 copy of every trained weight it casts, until
  the forward's autocast block ends; under FSDP, the gathered units (the root, the current and the prefetched layer).
- during generation (PPO stages): the KV cache, 2 x layers x kv_heads x head_dim x tokens x bytes, and the bf16 actor
  (FSDP: the gathered copy of the rollout; DDP: autocast's cached copy), plus the prompt's forward (prefill).
The peak is the larger of two phases: learning (weights, gradients, states, frozen, activations) and generation
(the same without gradients, which zero_grad(set_to_none=True) frees, plus the actor copy and the KV cache). The
scoring pass between them (no-grad forwards) needs less than either. Not counted: the CUDA context and NCCL buffers
(about 1 GiB), allocator fragmentation, and AdamW's `step` scalars: hence `--reserve_gib`.
"""

import argparse
import json
from pathlib import Path

GIB = 2**30

# Llama shapes, no download. llama-1b is TinyLlama-1.1B's shape (Llama-2 vocabulary, grouped-query attention).
PRESETS = {
    "llama-1b": dict(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    ),
    "llama-7b": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        tie_word_embeddings=False,
    ),
    "llama-13b": dict(
        vocab_size=32000,
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        tie_word_embeddings=False,
    ),
}

# stage -> (trained models, frozen models); "lm" = a causal LM, "score" = the backbone + a 1-output head (no LM head)
STAGES = {
    "sft": (["lm"], []),
    "reward": (["score"], []),
    "cost": (["score"], []),
    "ppo": (["lm", "score"], ["lm", "score", "score"]),  # actor, reward critic; reference, reward, cost (for the logs)
    "reward_shaping": (["lm", "score"], ["lm", "score", "score"]),
    "ppo_lag": (
        ["lm", "score", "score"],
        ["lm", "score", "score"],
    ),  # actor, reward and cost critics; reference, reward, cost
}
# sequences per device per micro-step: the scripts' defaults (preference_model.py: 16 pairs = 32 sequences)
DEFAULT_BATCH = {"sft": 4, "reward": 32, "cost": 32, "ppo": 16, "reward_shaping": 16, "ppo_lag": 16}


def llama_fields(config):
    """The fields the plan needs, from a transformers config or a plain dict, with Llama's defaults."""
    get = config.get if isinstance(config, dict) else (lambda name, default=None: getattr(config, name, default))
    heads = get("num_attention_heads")
    return dict(
        vocab=get("vocab_size"),
        hidden=get("hidden_size"),
        intermediate=get("intermediate_size"),
        layers=get("num_hidden_layers"),
        heads=heads,
        kv_heads=get("num_key_value_heads") or heads,
        head_dim=get("head_dim") or get("hidden_size") // heads,
        tied=bool(get("tie_word_embeddings", False)),
        attention_bias=bool(get("attention_bias", False)),
        mlp_bias=bool(get("mlp_bias", False)),
    )


def parameter_shapes(config, head):
    """Every parameter's shape, in the model's order: LlamaForCausalLM (head "lm") or LlamaForSequenceClassification
    with one label (head "score"). FSDP shards each of these on dim 0, so the shapes, not only the count, matter."""
    f = llama_fields(config)
    h = f["hidden"]
    shapes = [(f["vocab"], h)] + layer_shapes(config) * f["layers"] + [(h,)]  # embeddings, layers, final norm
    if head == "lm":
        return shapes + ([] if f["tied"] else [(f["vocab"], h)])  # a tied LM head is the embedding matrix itself
    return shapes + [(1, h)]  # score head: hidden -> 1, no bias


def layer_shapes(config):
    """One decoder layer's parameter shapes (out, in) for the projections, as nn.Linear stores them."""
    f = llama_fields(config)
    h, q_dim, kv_dim, i = f["hidden"], f["heads"] * f["head_dim"], f["kv_heads"] * f["head_dim"], f["intermediate"]
    layer = [(q_dim, h), (kv_dim, h), (kv_dim, h)]  # q, k, v projections (grouped-query: kv_heads <= heads)
    layer += [(q_dim,), (kv_dim,), (kv_dim,)] if f["attention_bias"] else []
    layer += [(h, q_dim)] + ([(h,)] if f["attention_bias"] else [])  # o projection
    layer += [(i, h), (i, h), (h, i)] + ([(i,), (i,), (h,)] if f["mlp_bias"] else [])  # gate, up, down
    return layer + [(h,), (h,)]  # the two RMSNorms


def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def local_numel(shape, world_size, rank):
    """Elements of one parameter on RANK under FSDP2: torch.chunk on dim 0, ceil(d0 / N) rows per rank. Every rank's
    storage is padded to rank 0's share (the all-gather needs equal pieces), so rank 0's count is the per-GPU cost."""
    rows_per_rank = -(-shape[0] // world_size)
    rows = max(0, min(rows_per_rank, shape[0] - rank * rows_per_rank))
    return rows * numel(shape[1:])


def parameter_count(config, head):
    return sum(numel(s) for s in parameter_shapes(config, head))


def layer_activation_bytes(config, mode):
    """Bytes that autograd keeps per token per decoder layer for the backward, by precision MODE. Counted from the
    tensors a Hugging Face Llama layer saves (measured with saved_tensors_hooks, tests/test_memory_plan.py), with
    h = hidden, q = heads x head_dim (= h in Llama), kv = kv_heads x head_dim, i = intermediate, n = heads:
      fp32      24h + 8q + 8kv + 16i + 4n + 8   (CPU)
      bf16      16h + 4q + 4kv + 8i + 4n + 8    (bf16 parameters: FSDP's MixedPrecisionPolicy)
      autocast  26h + 4q + 4kv + 8i + 4n + 8    (fp32 parameters under bf16 autocast: DDP on CUDA)
    Per RMSNorm: its fp32 input, the normalised fp32 hidden, the bf16 output (autocast instead keeps one bf16 cast per
    projection that reads it: 3 before attention, 2 before the MLP). Attention: rotated q and k, v, the output and
    the log-sum-exp (memory-efficient SDPA: no T x T matrix; the math backend would add heads x T^2). MLP: gate, up,
    silu(gate) and the product, i wide each. The 4-byte row statistics (rsqrt, log-sum-exp) are the 4n + 8."""
    f = llama_fields(config)
    h, q, kv, i, n = (
        f["hidden"],
        f["heads"] * f["head_dim"],
        f["kv_heads"] * f["head_dim"],
        f["intermediate"],
        f["heads"],
    )
    if mode == "fp32":
        return 24 * h + 8 * q + 8 * kv + 16 * i + 4 * n + 8
    if mode == "bf16":
        return 16 * h + 4 * q + 4 * kv + 8 * i + 4 * n + 8
    if mode == "autocast":
        return 26 * h + 4 * q + 4 * kv + 8 * i + 4 * n + 8
    raise ValueError(f"mode must be fp32, bf16 or autocast, not {mode!r}")


def activation_bytes(config, head, tokens, mode, gradient_checkpointing):
    """Activations of one forward + backward over TOKENS tokens (batch x length). Without checkpointing: every layer's
    saved tensors. With it (Hugging Face's, one checkpoint per layer): each layer keeps only its input (the residual
    stream: fp32 under autocast and on CPU, bf16 with bf16 parameters), and one layer at a time is recomputed in full.
    An LM adds its logits: the logits in the activation dtype plus three fp32 vocabulary-wide vectors per token (the
    log-softmax kept for backward, its gradient, the logits' gradient). A score head adds nothing noticeable."""
    f = llama_fields(config)
    per_layer = layer_activation_bytes(config, mode)
    if gradient_checkpointing:
        residual_bytes = 2 if mode == "bf16" else 4
        layers = f["layers"] * residual_bytes * f["hidden"] + per_layer
    else:
        layers = f["layers"] * per_layer
    logits = ((2 if mode in ("bf16", "autocast") else 4) + 12) * f["vocab"] if head == "lm" else 0
    return tokens * (layers + logits)


def memory_plan(
    config,
    world_size=1,
    fsdp=False,
    stage="ppo_lag",
    batch_size=None,
    seq_len=512,
    prompt_len=None,
    gradient_checkpointing=True,
    bf16=True,
    rank=0,
):
    """Expected bytes on RANK's GPU for STAGE (a dict, see the module docstring). BATCH_SIZE: sequences per device per
    micro-step (also the rollout's prompts per device for PPO); SEQ_LEN: prompt + answer tokens; PROMPT_LEN: the
    prompt part, for the prefill of generation (default half of SEQ_LEN). BF16: the CUDA settings (bf16 frozen models,
    bf16 compute); off: everything in fp32, as on CPU."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {', '.join(STAGES)}, not {stage!r}")
    f = llama_fields(config)
    trained, frozen = STAGES[stage]
    batch_size = batch_size or DEFAULT_BATCH[stage]
    prompt_len = prompt_len or seq_len // 2
    shards = world_size if fsdp else 1  # DDP keeps the whole model on every rank

    def held(head):  # elements of one model on this rank
        return sum(local_numel(s, shards, rank) for s in parameter_shapes(config, head))

    trained_elements = sum(held(head) for head in trained)
    frozen_bytes = 2 if bf16 else 4
    plan = {
        "stage": stage,
        "world_size": world_size,
        "fsdp": fsdp,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "rank": rank,
        "parameters": {head: parameter_count(config, head) for head in ("lm", "score")},
        "trained_weights": 4 * trained_elements,
        "gradients": 4 * trained_elements,
        "optimizer_states": 8 * trained_elements,
        "frozen_weights": frozen_bytes * sum(held(head) for head in frozen),
        "ddp_buckets": 4 * trained_elements if not fsdp and world_size > 1 else 0,
    }
    plan["static"] = plan["trained_weights"] + plan["gradients"] + plan["optimizer_states"] + plan["frozen_weights"]

    # learning: one trained model's forward + backward at a time (each backward frees its activations); the largest
    mode = "fp32" if not bf16 else ("bf16" if fsdp else "autocast")
    param_bytes = 2 if bf16 else 4
    tokens = batch_size * seq_len
    layer_elements = sum(numel(s) for s in layer_shapes(config))

    def transient(head, checkpointing):
        if fsdp:  # gathered: the root (all but the layers) and two layers, plus one layer's unsharded gradient
            root_elements = parameter_count(config, head) - f["layers"] * layer_elements
            copies = param_bytes * (root_elements + 2 * layer_elements) + (param_bytes + 4) * layer_elements
        else:  # autocast's bf16 copy of every weight the forward casts
            copies = 2 * parameter_count(config, head) if mode == "autocast" else 0
        return activation_bytes(config, head, tokens, mode, checkpointing), copies

    plan["activations_gc"] = max(transient(head, True)[0] for head in trained)
    plan["activations_no_gc"] = max(transient(head, False)[0] for head in trained)
    learning = max(sum(transient(head, gradient_checkpointing)) for head in trained)
    plan["activations"] = plan["activations_gc" if gradient_checkpointing else "activations_no_gc"]
    plan["learning_weight_copies"] = learning - plan["activations"]
    plan["learning_peak"] = plan["static"] + plan["ddp_buckets"] + learning

    # generation (PPO stages): the actor generates batch_size answers up to seq_len tokens with the KV cache
    plan["generation_actor"] = plan["kv_cache"] = plan["prefill"] = plan["generation_peak"] = 0
    if "lm" in trained and stage != "sft":
        kv_dim = f["kv_heads"] * f["head_dim"]
        plan["kv_cache"] = 2 * f["layers"] * kv_dim * batch_size * seq_len * param_bytes
        plan["generation_actor"] = param_bytes * parameter_count(config, "lm") if (fsdp or mode == "autocast") else 0
        q_dim = f["heads"] * f["head_dim"]
        plan["prefill"] = (
            batch_size * prompt_len * (2 * q_dim + 2 * kv_dim + 3 * f["intermediate"]) * param_bytes
            + batch_size * f["vocab"] * 4
        )
        plan["generation_peak"] = (
            plan["static"]
            - plan["gradients"]
            + plan["ddp_buckets"]
            + plan["generation_actor"]
            + plan["kv_cache"]
            + plan["prefill"]
        )
    plan["peak"] = max(plan["learning_peak"], plan["generation_peak"])
    return plan


ROWS = [  # (key, label) in the printed table
    ("trained_weights", "trained weights (fp32 masters)"),
    ("gradients", "gradients (fp32)"),
    ("optimizer_states", "AdamW states (2 fp32 moments)"),
    ("frozen_weights", "frozen models"),
    ("static", "= weights + gradients + states + frozen"),
    ("ddp_buckets", "DDP all-reduce buckets"),
    ("activations_no_gc", "activations, no gradient checkpointing"),
    ("activations_gc", "activations, gradient checkpointing"),
    ("learning_weight_copies", "weight copies while learning (autocast bf16 / FSDP gathered)"),
    ("learning_peak", "PEAK while learning"),
    ("generation_actor", "actor copy during generation (bf16 / FSDP gathered)"),
    ("kv_cache", "KV cache"),
    ("prefill", "prompt forward (prefill)"),
    ("generation_peak", "PEAK while generating"),
]


def format_plan(plan, gpu_gib, reserve_gib):
    lines = [
        f"stage {plan['stage']}, world size {plan['world_size']}, {'FSDP' if plan['fsdp'] else 'DDP'}, "
        f"{plan['batch_size']} sequences x {plan['seq_len']} tokens per device, rank {plan['rank']}; "
        f"parameters: LM {plan['parameters']['lm'] / 1e9:.3f}B, "
        f"score model {plan['parameters']['score'] / 1e9:.3f}B"
    ]
    unit, scale = ("GiB", GIB) if plan["peak"] >= GIB else ("MiB", 2**20)  # a tiny model reads better in MiB
    lines += [
        f"  {label:<62} {plan[key] / scale:9.2f} {unit}"
        for key, label in ROWS
        if plan[key] or key in ("static", "learning_peak")
    ]
    usable = gpu_gib - reserve_gib
    verdict = "fits" if plan["peak"] <= usable * GIB else "does not fit"
    lines.append(
        f"  peak {plan['peak'] / GIB:.2f} GiB against {usable:g} GiB usable ({gpu_gib:g} GiB - {reserve_gib:g} "
        f"reserved): {verdict}"
    )
    return "\n".join(lines)


def paper_table(gpu_gib=80, reserve_gib=2, world_size=8):
    """The README's table: DDP vs FSDP on WORLD_SIZE x GPU_GIB at 1B, 7B, 13B; SFT 4 x 512, PPO-Lagrangian 16 x 512."""
    usable = (gpu_gib - reserve_gib) * GIB
    lines = [
        f"per GPU on {world_size} x {gpu_gib} GiB, gradient checkpointing on, bf16 "
        "(GiB; weights+grads+states+frozen / peak)",
        "| model | stage | DDP static | DDP peak | FSDP static | FSDP peak | fits (DDP / FSDP) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in PRESETS:
        for stage, batch in (("sft", 4), ("ppo_lag", 16)):
            ddp = memory_plan(PRESETS[name], world_size, False, stage, batch, 512)
            fsdp = memory_plan(PRESETS[name], world_size, True, stage, batch, 512)
            fits = " / ".join("yes" if p["peak"] <= usable else "no" for p in (ddp, fsdp))
            lines.append(
                f"| {name} | {stage} | {ddp['static'] / GIB:.1f} | {ddp['peak'] / GIB:.1f} | "
                f"{fsdp['static'] / GIB:.1f} | {fsdp['peak'] / GIB:.1f} | {fits} |"
            )
    return "\n".join(lines)


def load_config(model):
    """A preset name, a config.json, or a directory holding one."""
    if model in PRESETS:
        return PRESETS[model]
    path = Path(model)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise SystemExit(
            f"error: --model {model}: neither a preset ({', '.join(PRESETS)}) nor a config.json or a directory "
            "holding one"
        )
    return json.loads(path.read_text())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default="llama-7b", help=f"a preset ({', '.join(PRESETS)}) or a config.json / model directory"
    )
    parser.add_argument("--stage", default="ppo_lag", choices=list(STAGES))
    parser.add_argument("--world_size", type=int, default=8)
    parser.add_argument("--fsdp", action="store_true", help="FSDP full sharding (default: DDP)")
    parser.add_argument(
        "--batch_size", type=int, default=None, help="sequences per device per micro-step (default: the stage script's)"
    )
    parser.add_argument("--seq_len", type=int, default=512, help="tokens per sequence (prompt + answer)")
    parser.add_argument("--no_gradient_checkpointing", action="store_true")
    parser.add_argument("--no_bf16", action="store_true", help="everything in fp32, as on CPU")
    parser.add_argument("--gpu_gib", type=float, default=80.0)
    parser.add_argument("--reserve_gib", type=float, default=2.0, help="CUDA context, NCCL buffers, fragmentation")
    parser.add_argument("--paper_table", action="store_true", help="print the 1B/7B/13B DDP vs FSDP table and exit")
    args = parser.parse_args()
    if args.paper_table:
        print(paper_table(args.gpu_gib, args.reserve_gib, args.world_size))
        return
    plan = memory_plan(
        load_config(args.model),
        args.world_size,
        args.fsdp,
        args.stage,
        args.batch_size,
        args.seq_len,
        gradient_checkpointing=not args.no_gradient_checkpointing,
        bf16=not args.no_bf16,
    )
    print(format_plan(plan, args.gpu_gib, args.reserve_gib))


if __name__ == "__main__":
    main()
