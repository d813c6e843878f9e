"""The FSDP2 recipe for the four scripts, proven on CPU (gloo) with asserts: issue 12's research script.

Each item below is one thing the scripts need from FSDP2 (`torch.distributed.fsdp.fully_shard`), checked against the
same computation in one process without FSDP, on the tiny Llama of data/tiny-llama (1M parameters):

  a) shard each decoder layer, then the root: a causal LM, a score model, and a critic (a wrapper module whose
     forward calls the backbone and the head directly, as ppo_lagrangian.py's Critic does)
  b) one AdamW step on 2 ranks (each half of a global batch) = the one-process step on the whole batch, also with
     2 accumulation micro-steps (no reduce-scatter on the first) and with gradient checkpointing
  c) clip_grad_norm_ on the sharded (DTensor) gradients: the global norm
  d) the full state dict gathered for save_pretrained: an ordinary Hugging Face checkpoint, same logits
  e) generation with the actor gathered once per rollout, not once per generated token
  f) each rank holds its torch.chunk share of every parameter (about half at world size 2)
  g) mixed precision: off on CPU (fp32); the CUDA policy
  h) frozen models (reference, reward, cost) under fully_shard
  i) torch.distributed.checkpoint (dcp.save / dcp.load) round-trips the sharded model and its AdamW state

Run (about 20 s on 2 CPU cores):
    python -m torch.distributed.run --standalone --nproc_per_node=2 bench/fsdp_prototype.py
Prints PASS or FAIL per item on rank 0; the exit status is 1 if any item failed.
"""

import copy
import os
import shutil
import sys
import tempfile
import traceback
from collections import Counter
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

TINY_LLAMA = Path(__file__).resolve().parent.parent / "data" / "tiny-llama"
torch.set_num_threads(1)  # two ranks on a shared 2-core machine


# ---- the recipe: what the scripts copy ----
def decoder_layers(model):
    """The repeated blocks of any Hugging Face model: the modules whose class Hugging Face itself lists as not to be
    split across devices (`_no_split_modules`, e.g. {"LlamaDecoderLayer"}). Found by class name rather than by
    `model.model.layers`, so a wrapper (our Critic) or another architecture (`transformer.h`) needs no special case.
    Call it before sharding: fully_shard renames each class (LlamaDecoderLayer -> FSDPLlamaDecoderLayer)."""
    names = set()
    for module in model.modules():
        names |= set(getattr(module, "_no_split_modules", None) or ())
    return [module for module in model.modules() if type(module).__name__ in names]


def shard(model, mp_policy=None, reshard_root_after_forward=None):
    """FSDP2: each decoder layer is one unit (gathered just before its forward, freed after it), then the root holds
    the rest (embeddings, final norm, LM or score head). The root must be the module whose forward is called: its
    hooks gather the root's parameters (sharding the score model inside our Critic fails: "aten.embedding got mixed
    torch.Tensor and DTensor"). Tied embeddings stay tied because both uses live in the root unit. The root keeps its
    parameters gathered after a forward (backward needs them next); a frozen model has no backward, so pass
    reshard_root_after_forward=True for it, or its embeddings and head stay gathered between calls (item h)."""
    mp_policy = mp_policy or MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=mp_policy)
    fully_shard(model, mp_policy=mp_policy, reshard_after_forward=reshard_root_after_forward)
    return model


@contextmanager
def gathered_for_generation(model):
    """Gather the actor once per rollout. By default each layer is all-gathered before and freed after every forward,
    i.e. once per generated token. With reshard_after_forward off, the first forward (the prompt) gathers every unit
    and the later ones (one token each, with the KV cache) find them gathered: no collective until the reshard.
    That also lets each rank stop at its own answers' end: transformers 5.23 sees an FSDP module and sets
    generate(synced_gpus=True) by itself (every rank runs forwards, with an all-reduce per token, until all are done,
    which per-token all-gathers would need); pass synced_gpus=False with this context."""
    units = [module for module in model.modules() if isinstance(module, FSDPModule)]
    model.set_reshard_after_forward(False)  # recurses into the layers
    try:
        yield model
    finally:
        model.set_reshard_after_forward(True)  # the layers' default
        model.set_reshard_after_forward(False, recurse=False)  # the root's default: backward needs it right away
        for unit in units:
            unit.reshard()  # free the gathered copy now, before the update allocates gradients and activations


def full_state_dict(model):
    """The whole model as ordinary tensors on the CPU (a collective: every rank calls it; rank 0 writes it)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ---- helpers of the checks ----
class Critic(torch.nn.Module):
    """The shape of ppo_lagrangian.py's Critic: its forward calls the backbone and the score head directly. FSDP2 warns
    that its output (a squeeze) is a view: harmless unless the caller changes it in place."""

    def __init__(self, score_model):
        super().__init__()
        self.score_model = score_model

    def forward(self, input_ids):
        hidden = self.score_model.model(input_ids=input_ids).last_hidden_state  # (B, T, H)
        return self.score_model.score(hidden).squeeze(-1)  # (B, T)


def tiny_models(seed=0):
    """The causal LM and the 1-output score model, the same weights on every rank."""
    config = AutoConfig.from_pretrained(TINY_LLAMA)
    score_config = copy.deepcopy(config)
    score_config.num_labels = 1  # transformers 5: from_config(config, num_labels=1) is a TypeError
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config), AutoModelForSequenceClassification.from_config(score_config)


@contextmanager
def count_collectives():
    """Counts FSDP2's collectives: in torch 2.13 it calls dist.all_gather_single and dist.reduce_scatter_single."""
    counts, originals = (
        Counter(),
        {name: getattr(dist, name) for name in ("all_gather_single", "reduce_scatter_single", "all_reduce")},
    )

    def counted(name):
        def call(*args, **kwargs):
            counts[name] += 1
            return originals[name](*args, **kwargs)

        return call

    for name in originals:
        setattr(dist, name, counted(name))
    try:
        yield counts
    finally:
        for name, function in originals.items():
            setattr(dist, name, function)


def global_batch():
    """8 sequences of 12 tokens; the answer (labelled) part starts at a different place in each, so the ranks hold
    different numbers of labelled tokens, as in SFT."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 2048, (8, 12), generator=generator)
    labels = input_ids.clone()
    for row, start in enumerate(torch.randint(1, 10, (8,), generator=generator).tolist()):
        labels[row, :start] = -100
    return input_ids, labels


def lm_loss_sum(model, input_ids, labels):
    """Σ over labelled tokens of −log p(token): a SUM, divided by the global count by the caller."""
    logits = model(input_ids=input_ids).logits  # (B, T, V)
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
    )


def train_step(model, input_ids, labels, micro_steps, world_size, max_grad_norm=None):
    """One AdamW step on this rank's rows in MICRO_STEPS micro-batches. The loss of the global batch is a MEAN over
    all labelled tokens, Σ/N. FSDP2, like DDP, AVERAGES gradients over ranks (divides the sum by world_size), so each
    rank backpropagates Σ_local/N × world_size, and the average is Σ_all/N. The non-last micro-steps keep their
    gradients unreduced (set_requires_gradient_sync(False), FSDP2's no_sync): one reduce-scatter per step."""
    # lr 1e-4: Adam's first step is lr·g/(|g| + ε), so where |g| is near ε = 1e-8 an fp32 rounding difference in g
    # (another summation order: half batches, then a reduce-scatter) moves the step by a visible part of lr (1.5e-5 at
    # lr 1e-3). The gradients themselves agree to 1e-7.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    total_tokens = (labels[:, 1:] != -100).sum()  # N, global: every rank holds the whole batch here
    rank = dist.get_rank() if world_size > 1 else 0
    local_input_ids, local_labels = input_ids.chunk(world_size)[rank], labels.chunk(world_size)[rank]
    sharded = isinstance(model, FSDPModule)
    for step, (micro_input_ids, micro_labels) in enumerate(
        zip(local_input_ids.chunk(micro_steps), local_labels.chunk(micro_steps))
    ):
        if sharded:
            model.set_requires_gradient_sync(step == micro_steps - 1)
        (lm_loss_sum(model, micro_input_ids, micro_labels) / total_tokens * world_size).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm if max_grad_norm else float("inf"))
    optimizer.step()
    return model, optimizer, (norm.full_tensor() if isinstance(norm, DTensor) else norm)


def max_difference(sharded, plain):
    """The largest |difference| between the gathered parameters of a sharded model and a plain one's."""
    plain_parameters = dict(plain.named_parameters())
    return max((p.full_tensor() - plain_parameters[name]).abs().max().item() for name, p in sharded.named_parameters())


def local_numel(model):
    return sum(p.to_local().numel() for p in model.parameters())


def chunk_numel(shape, world_size, rank):
    """FSDP2 shards a parameter on dim 0 as torch.chunk does: ceil(d0 / W) rows per rank, the last ranks get fewer
    (or none). The storage of every rank is padded to the ceil, so rank 0's share is the per-GPU cost."""
    rows_per_rank = -(-shape[0] // world_size)
    rows = max(0, min(rows_per_rank, shape[0] - rank * rows_per_rank))
    return rows * (torch.Size(shape).numel() // shape[0])


# ---- the checks ----
def check_a(rank, world_size):
    lm, score_model = tiny_models()
    critic = Critic(score_model)
    layers = len(decoder_layers(lm))  # before sharding: fully_shard renames the class to FSDPLlamaDecoderLayer
    assert layers == len(decoder_layers(critic)) == 4
    for model in (shard(lm), shard(critic)):
        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        assert len(units) == layers + 1, len(units)
        assert all(isinstance(p, DTensor) for p in model.parameters())
    assert lm.lm_head.weight is lm.model.embed_tokens.weight, "tie broken"
    input_ids, labels = global_batch()
    lm_loss_sum(lm, input_ids, labels).backward()
    critic(input_ids).sum().backward()
    assert all(p.grad is not None for p in list(lm.parameters()) + list(critic.parameters()))
    return (
        f"fully_shard(layer) for each of {layers} layers found by _no_split_modules, then fully_shard(root); "
        "LM, critic wrapper: forward + backward"
    )


def check_b(rank, world_size):
    input_ids, labels = global_batch()
    plain, _, _ = train_step(tiny_models()[0], input_ids, labels, micro_steps=1, world_size=1)
    notes = []
    for micro_steps, checkpointing in ((1, False), (2, False), (2, True)):
        model = tiny_models()[0]
        # before sharding, as the scripts load then wrap. transformers 5.23 renamed it from
        # gradient_checkpointing_enable (deprecated); non-reentrant by default
        if checkpointing:
            model.activation_checkpointing_enable()
        with count_collectives() as counts:
            model, _, _ = train_step(shard(model), input_ids, labels, micro_steps, world_size)
        difference = max_difference(model, plain)
        assert difference < 1e-5, (micro_steps, checkpointing, difference)
        assert counts["reduce_scatter_single"] == 5, counts  # one per unit per optimiser step, whatever micro_steps is
        notes.append(
            f"{micro_steps} micro{' +GC' if checkpointing else ''}: max|Δ| {difference:.1e}, "
            f"{counts['reduce_scatter_single']} reduce-scatters"
        )
    return "; ".join(notes)


def check_c(rank, world_size):
    input_ids, labels = global_batch()
    plain, _, plain_norm = train_step(
        tiny_models()[0], input_ids, labels, micro_steps=1, world_size=1, max_grad_norm=0.1
    )
    model, _, norm = train_step(
        shard(tiny_models()[0]), input_ids, labels, micro_steps=2, world_size=world_size, max_grad_norm=0.1
    )
    assert abs(norm.item() - plain_norm.item()) < 1e-5 * plain_norm.item(), (norm, plain_norm)
    assert plain_norm > 0.1  # the clip was active
    difference = max_difference(model, plain)
    assert difference < 1e-5, difference
    return (
        f"clip_grad_norm_ returns a DTensor; .full_tensor() {norm.item():.6f} = one process {plain_norm.item():.6f}; "
        f"clipped step max|Δ| {difference:.1e}"
    )


def check_d(rank, world_size):
    input_ids, labels = global_batch()
    lm, score_model = tiny_models()
    critic = Critic(score_model)
    lm, _, _ = train_step(shard(lm), input_ids, labels, micro_steps=1, world_size=world_size)
    shard(critic)
    directory = shared_temporary_directory(rank)
    notes = []
    for name, live, saved_model, auto_class in (
        ("lm", lm, lm, AutoModelForCausalLM),
        ("score", critic, score_model, AutoModelForSequenceClassification),
    ):
        state_dict = full_state_dict(saved_model)  # every rank; a dict of plain CPU tensors, the original names
        with torch.no_grad():
            live_output = (
                live(input_ids).logits if name == "lm" else live(input_ids)[:, -1]
            )  # the collective forward, every rank
        if rank == 0:
            assert all(type(t) is torch.Tensor and t.device.type == "cpu" for t in state_dict.values())
            assert not any(
                "_fsdp" in key or "_checkpoint" in key or key.startswith("score_model.") for key in state_dict
            )
            keys = set(state_dict)
            saved_model.save_pretrained(
                directory / name, state_dict=state_dict
            )  # note: it empties the dict it is given
            loaded = auto_class.from_pretrained(directory / name)
            with torch.no_grad():
                loaded_output = loaded(input_ids=input_ids).logits
            loaded_output = loaded_output if name == "lm" else loaded_output[:, 0]  # the score at the last token
            difference = (loaded_output - live_output).abs().max().item()
            assert difference < 1e-5, (name, difference)
            if name == "lm":
                assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
                notes.append(
                    f"LM: {len(keys)} keys, lm_head.weight {'in' if 'lm_head.weight' in keys else 'not in'} the "
                    "gathered dict, the reload is tied"
                )
            notes.append(f"{name}: reloaded logits max|Δ| {difference:.1e}")
    dist.barrier()
    if rank == 0:
        shutil.rmtree(directory)
    return "; ".join(notes)


def check_e(rank, world_size):
    plain = tiny_models()[0].eval()
    actor = shard(tiny_models()[0]).eval()
    prompt = torch.randint(
        3, 2048, (2, 5), generator=torch.Generator().manual_seed(10 + rank)
    )  # each rank its own prompts
    settings = dict(do_sample=False, eos_token_id=None, pad_token_id=0, attention_mask=torch.ones_like(prompt))
    expected = plain.generate(prompt, max_new_tokens=6 + 4 * rank, **settings)
    # default: transformers sees an FSDP module and sets synced_gpus=True, so the ranks step together
    with count_collectives() as default_counts:
        tokens = actor.generate(prompt, max_new_tokens=6, **settings)
    assert torch.equal(tokens, expected[:, : tokens.shape[1]])
    assert not isinstance(actor.lm_head.weight, DTensor)  # the root stays gathered after a forward (see h)
    actor.reshard()
    # gathered once: the ranks even stop at different lengths (6 and 10 new tokens), no collective after the first
    with count_collectives() as once_counts, gathered_for_generation(actor):
        tokens = actor.generate(prompt, max_new_tokens=6 + 4 * rank, synced_gpus=False, **settings)
    assert torch.equal(tokens, expected), "gathered generation differs from the plain model's"
    assert once_counts["all_gather_single"] == 5 and once_counts["all_reduce"] == 0, once_counts
    assert all(isinstance(p, DTensor) for p in actor.parameters()), "not resharded after generation"
    input_ids, labels = global_batch()
    lm_loss_sum(actor.train(), input_ids, labels).backward()  # training still works after the reshard
    return (
        "same greedy tokens as the plain model; all-gathers for 6 tokens: "
        f"default {default_counts['all_gather_single']} (+{default_counts['all_reduce']} synced_gpus all-reduces), "
        f"gathered once {once_counts['all_gather_single']} (0 all-reduces)"
    )


def check_f(rank, world_size):
    lm, score_model = tiny_models()
    shapes = {name: [p.shape for p in model.parameters()] for name, model in (("lm", lm), ("score", score_model))}
    totals = {name: sum(p.numel() for p in model.parameters()) for name, model in (("lm", lm), ("score", score_model))}
    notes = []
    for name, model in (("lm", shard(lm)), ("score", shard(score_model))):
        local = local_numel(model)
        assert local == sum(chunk_numel(shape, world_size, rank) for shape in shapes[name]), name
        every_rank = [None] * world_size
        dist.all_gather_object(every_rank, local)
        assert sum(every_rank) == totals[name]
        notes.append(f"{name}: {totals[name]} = " + " + ".join(map(str, every_rank)))
    return "; ".join(notes) + " (score.weight (1, 128): rank 0 holds its one row, rank 1 none)"


def check_g(rank, world_size):
    model = shard(tiny_models()[0])  # MixedPrecisionPolicy() = no casting: fp32 parameters, gradients, reduction
    assert all(p.dtype == torch.float32 for p in model.parameters())
    cuda_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    # the same policy on CPU/gloo: informative only (the scripts keep fp32 on CPU)
    try:
        bf16_model = shard(tiny_models()[0], mp_policy=cuda_policy)
        input_ids, labels = global_batch()
        lm_loss_sum(bf16_model, input_ids, labels).backward()
        grad_dtypes = {p.grad.dtype for p in bf16_model.parameters()}
        on_cpu = f"it also runs on CPU/gloo (masters {bf16_model.lm_head.weight.dtype}, grads {grad_dtypes})"
    except Exception as error:  # noqa: BLE001
        on_cpu = f"it fails on CPU/gloo ({type(error).__name__}: {str(error)[:80]})"
    return f"CPU: MixedPrecisionPolicy() keeps fp32; CUDA: {cuda_policy}; {on_cpu}"


def check_h(rank, world_size):
    plain = tiny_models()[0].eval()
    notes = []
    for reshard_root in (None, True):
        frozen = shard(tiny_models()[0].requires_grad_(False).eval(), reshard_root_after_forward=reshard_root)
        input_ids, _ = global_batch()
        with torch.no_grad():
            difference = (frozen(input_ids=input_ids).logits - plain(input_ids=input_ids).logits).abs().max().item()
        assert difference < 1e-5
        assert all(not p.requires_grad for p in frozen.parameters())
        root_gathered = not isinstance(frozen.lm_head.weight, DTensor)
        layer_gathered = not isinstance(frozen.model.layers[0].mlp.up_proj.weight, DTensor)
        assert not layer_gathered
        assert root_gathered == (reshard_root is None), "the root's default changed"
        notes.append(
            f"root reshard_after_forward={reshard_root}: logits max|Δ| {difference:.1e}, "
            f"root left gathered after forward: {root_gathered}"
        )
    return "; ".join(notes)


def check_i(rank, world_size):
    input_ids, labels = global_batch()
    directory = shared_temporary_directory(rank)
    model, optimizer, _ = train_step(shard(tiny_models()[0]), input_ids, labels, micro_steps=1, world_size=world_size)
    model_state, optimizer_state = get_state_dict(
        model, optimizer
    )  # sharded (DTensor) views: each rank writes its shards
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=directory)

    resumed = shard(tiny_models(seed=123)[0])  # different weights, fresh optimiser
    resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=1e-4, weight_decay=0.01)
    model_state, optimizer_state = get_state_dict(resumed, resumed_optimizer)  # the structure to load into
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(resumed, resumed_optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])

    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p.to_local(), q.to_local()), name
        for key in ("exp_avg", "exp_avg_sq", "step"):
            a, b = optimizer.state[p][key], resumed_optimizer.state[q][key]
            assert torch.equal(
                a.to_local() if isinstance(a, DTensor) else a, b.to_local() if isinstance(b, DTensor) else b
            ), (name, key)
    # one more identical step on both: the resumed run continues exactly
    for m, o in ((model, optimizer), (resumed, resumed_optimizer)):
        o.zero_grad()
        (lm_loss_sum(m, input_ids.chunk(world_size)[rank], labels.chunk(world_size)[rank]) / 100).backward()
        o.step()
    assert all(torch.equal(p.to_local(), q.to_local()) for p, q in zip(model.parameters(), resumed.parameters()))
    dist.barrier()
    if rank == 0:
        shutil.rmtree(directory)
    return "weights, exp_avg, exp_avg_sq, step bit-identical after load; the next step identical"


def shared_temporary_directory(rank):
    """A scratch directory made by rank 0, its path sent to every rank."""
    path = [tempfile.mkdtemp(prefix="fsdp_prototype_") if rank == 0 else None]
    dist.broadcast_object_list(path, src=0)
    return Path(path[0])


def main():
    dist.init_process_group(
        "gloo", timeout=timedelta(seconds=120)
    )  # a failed check on one rank must not hang the other forever
    rank, world_size = dist.get_rank(), dist.get_world_size()
    assert world_size == 2, "run with --nproc_per_node=2"
    if rank == 0:
        print(
            f"torch {torch.__version__}, transformers {__import__('transformers').__version__}, "
            f"world size {world_size}, gloo"
        )
    failed = 0
    for item, check in [
        ("a", check_a),
        ("b", check_b),
        ("c", check_c),
        ("d", check_d),
        ("e", check_e),
        ("f", check_f),
        ("g", check_g),
        ("h", check_h),
        ("i", check_i),
    ]:
        try:
            note, ok = check(rank, world_size), True
        except Exception as error:  # noqa: BLE001
            note, ok = f"{type(error).__name__}: {error}", False
            if os.environ.get("VERBOSE"):
                traceback.print_exc()
        every_rank = [None] * world_size
        dist.all_gather_object(every_rank, ok)
        ok = all(every_rank)
        failed += not ok
        if rank == 0:
            print(f"{'PASS' if ok else 'FAIL'} {item}) {note}", flush=True)
    dist.destroy_process_group()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
