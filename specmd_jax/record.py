"""Record routing traces from the Flax MoE model: `specmd-jax record`.

Each recorded sequence is one prefill pass over a prompt of P tokens from a text file, followed by
M decode passes, each feeding one greedily generated token. The trace therefore has P + M tokens
and 1 + M passes per sequence, with the full router logits of every MoE layer.

Speculative logits (MoE layer l + 1's router applied to layer l's router input, NaN for the last
MoE layer) go into the trace's `speculative_logits`, so a gate-speculative prefetcher can be
replayed without the model.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np

from specmd_jax.model.generate import greedy_generate, make_step_function
from specmd_jax.model.transformer import MoeTransformer
from specmd_jax.traces.trace import PASS_DECODE, PASS_PREFILL, Trace, TraceMetadata, make_trace, save_trace

logger = logging.getLogger(__name__)

DEFAULT_PROMPT_TOKENS = 256
DEFAULT_GEN_TOKENS = 64


class Tokenizer(Protocol):
    def encode(self, text: str) -> np.ndarray: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255: the tokenizer of models trained by experiments/train_tiny_moe.py."""

    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, tokens: np.ndarray) -> str:
        return bytes(int(t) for t in np.asarray(tokens).reshape(-1)).decode("utf-8", errors="replace")


class FileTokenizer:
    """A checkpoint's own tokenizer, read from its local `tokenizer.json` with the `tokenizers` library."""

    def __init__(self, directory: str | os.PathLike):
        path = Path(directory) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: file not found; the checkpoint's tokenizer is needed to encode the text")
        try:
            from tokenizers import Tokenizer as HfTokenizer
        except ImportError:
            raise ImportError("reading tokenizer.json needs the 'tokenizers' package: pip install tokenizers") from None
        try:
            self._tokenizer = HfTokenizer.from_file(str(path))
        except Exception as error:  # the tokenizers library raises a bare Exception for malformed files
            raise ValueError(f"{path}: not a readable tokenizer file ({error})") from None

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tokenizer.encode(text).ids, dtype=np.int32)

    def decode(self, tokens: np.ndarray) -> str:
        return self._tokenizer.decode([int(t) for t in np.asarray(tokens).reshape(-1)])


class RecordedTrace(NamedTuple):
    """A recorded trace and the generated tokens.

    Attributes:
      trace: the canonical trace, with `scores` (softmax probabilities of the selected experts, not
        renormalised), `router_logits` and `speculative_logits`.
      generated: int32 [sequences, M] the tokens fed to the decode passes.
    """

    trace: Trace
    generated: np.ndarray

    @property
    def speculative_logits(self) -> np.ndarray:
        return self.trace.speculative_logits


def split_prompts(tokens: np.ndarray, prompt_tokens: int, sequences: int) -> list[np.ndarray]:
    """Cut `sequences` consecutive, non-overlapping prompts of `prompt_tokens` tokens from `tokens`."""
    if prompt_tokens < 1 or sequences < 1:
        raise ValueError(f"prompt_tokens and sequences: expected positive integers, got {prompt_tokens} and {sequences}")
    needed = prompt_tokens * sequences
    if tokens.shape[0] < needed:
        raise ValueError(
            f"the text has {tokens.shape[0]} tokens, fewer than {sequences} prompts x {prompt_tokens} tokens = {needed}; "
            "use a longer text, fewer sequences or shorter prompts"
        )
    return [tokens[i * prompt_tokens:(i + 1) * prompt_tokens] for i in range(sequences)]


def record_trace(
    model: MoeTransformer,
    prompts: list[np.ndarray],
    gen_tokens: int,
    *,
    model_name: str,
    source: str,
    notes: str = "",
    progress: bool = False,
) -> RecordedTrace:
    """Run each prompt as one prefill pass, then `gen_tokens` greedy decode passes, and build the trace."""
    if gen_tokens < 0:
        raise ValueError(f"gen_tokens: expected a non-negative integer, got {gen_tokens}")
    config = model.config
    step = make_step_function(model, record=True)
    expert_ids, probs, logits, speculative, generated = [], [], [], [], []
    pass_lengths, pass_kind, pass_sequence = [], [], []
    for sequence, prompt in enumerate(prompts):
        logger.info("sequence %d of %d: %d prompt tokens, %d decode passes", sequence + 1, len(prompts), len(prompt), gen_tokens)
        # Generating gen_tokens + 1 tokens runs the prefill and gen_tokens decode passes; the last
        # generated token is never fed back.
        generation = greedy_generate(model, prompt[None, :], gen_tokens + 1, record=True, progress=progress, step=step)
        generated.append(generation.tokens[0, :gen_tokens])
        for index, routing in enumerate(generation.passes):
            expert_ids.append(routing.expert_ids[0])
            probs.append(routing.probs[0])
            logits.append(routing.router_logits[0])
            speculative.append(routing.speculative_logits[0])
            pass_lengths.append(routing.expert_ids.shape[1])
            pass_kind.append(PASS_PREFILL if index == 0 else PASS_DECODE)
            pass_sequence.append(sequence)

    metadata = TraceMetadata(
        model=model_name, num_layers=config.num_moe_layers, num_experts=config.num_experts, top_k=config.top_k,
        source=source, layer_ids=tuple(config.moe_layers), notes=notes,
    )
    trace = make_trace(
        np.concatenate(expert_ids), metadata,
        pass_offsets=np.concatenate([[0], np.cumsum(pass_lengths)]),
        pass_kind=np.asarray(pass_kind), pass_sequence=np.asarray(pass_sequence),
        scores=np.concatenate(probs), router_logits=np.concatenate(logits),
        speculative_logits=np.concatenate(speculative), origin=source,
    )
    return RecordedTrace(trace, np.stack(generated).astype(np.int32))


def estimate_parameter_bytes(config) -> int:
    """Estimate the bytes of a model's parameters from its shapes (attention, experts, embeddings)."""
    itemsize = 2 if config.dtype == "bfloat16" else 4
    attention = config.hidden_size * config.head_dim * (2 * config.num_heads + 2 * config.num_kv_heads)
    experts = config.num_experts * 3 * config.hidden_size * config.expert_hidden_size
    shared = 3 * config.hidden_size * config.shared_expert_hidden_size
    per_layer = attention + experts + shared + config.num_experts * config.hidden_size
    embeddings = 2 * config.vocab_size * config.hidden_size
    return int((config.num_layers * per_layer + embeddings) * itemsize)


def check_fits_in_memory(config) -> None:
    """Raise `ValueError` when a randomly initialised preset would not fit in half of the physical memory."""
    needed = estimate_parameter_bytes(config)
    try:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if needed > available // 2:
        raise ValueError(
            f"preset '{config.name}' needs about {needed / 2**30:.1f} GiB of parameters in {config.dtype}, more than half "
            f"of this machine's {available / 2**30:.1f} GiB; use a small preset such as tiny-moe for smoke tests"
        )


def load_model(checkpoint: str | None, preset: str | None, dtype: str, seed: int = 0) -> tuple[MoeTransformer, Tokenizer, str]:
    """Load the model to record from, its tokenizer and a name for the trace metadata.

    `checkpoint` is a Hugging Face checkpoint directory (config.json + safetensors; its own
    tokenizer.json) or a run directory of experiments/train_tiny_moe.py (byte tokenizer). `preset`
    builds a randomly initialised model of a `specmd_jax.model.PRESETS` architecture (byte tokenizer).
    """
    from flax import nnx

    from specmd_jax.model.config import get_preset
    from specmd_jax.model.orbax_io import is_run_directory, restore_step

    if (checkpoint is None) == (preset is None):
        raise ValueError("give exactly one of a checkpoint directory and a model preset")
    if preset is not None:
        config = get_preset(preset).replace(dtype=dtype)
        check_fits_in_memory(config)
        logger.warning("model '%s' has random weights: its routing is not that of a trained model", preset)
        return MoeTransformer(config, rngs=nnx.Rngs(seed)), ByteTokenizer(), f"{preset} (random init, seed {seed})"
    directory = Path(checkpoint)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: checkpoint directory not found")
    if is_run_directory(directory):
        model, _, metadata, step = restore_step(directory)
        return model, ByteTokenizer(), f"{model.config.name} (trained, step {step})"
    from specmd_jax.checkpoints import load_hf_checkpoint

    model = load_hf_checkpoint(directory, dtype=dtype)
    return model, FileTokenizer(directory), model.config.name


def add_record_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `record` subcommand to the CLI's subparsers."""
    parser = subparsers.add_parser("record", help="record a routing trace by running an MoE model on a text")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="DIR", help="Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.json) or a train_tiny_moe run directory")
    source.add_argument("--model", metavar="NAME", help="architecture preset with random weights, for smoke tests")
    parser.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text file the prompts are cut from")
    parser.add_argument("--out", required=True, metavar="TRACE.npz", help="output trace file (canonical .npz)")
    parser.add_argument("--prompt-tokens", type=int, default=DEFAULT_PROMPT_TOKENS, help=f"tokens per prompt, run as one prefill pass (default {DEFAULT_PROMPT_TOKENS})")
    parser.add_argument("--gen-tokens", type=int, default=DEFAULT_GEN_TOKENS, help=f"decode passes per sequence, one generated token each (default {DEFAULT_GEN_TOKENS})")
    parser.add_argument("--sequences", type=int, default=1, help="number of prompts, cut consecutively from the text (default 1)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="parameter and activation dtype for imported or preset models (default bfloat16)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed for --model (default 0)")
    parser.add_argument("--quiet", action="store_true", help="hide the progress bar")
    parser.set_defaults(handler=cmd_record)
    return parser


def cmd_record(args: argparse.Namespace) -> int:
    """Run `specmd-jax record`."""
    from specmd_jax.cli import check_output_path

    text_path = Path(args.text)
    if not text_path.is_file():
        raise FileNotFoundError(f"{text_path}: text file not found" + (" (it is a directory)" if text_path.is_dir() else ""))
    for flag, value, low in (("--prompt-tokens", args.prompt_tokens, 1), ("--sequences", args.sequences, 1), ("--gen-tokens", args.gen_tokens, 0)):
        if value < low:
            raise ValueError(f"invalid {flag} {value}: expected an integer >= {low}")
    if Path(args.out).is_dir():
        check_output_path(args.out, "--out")
    try:
        text = text_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{text_path}: not valid UTF-8 at byte {error.start} ({error.object[error.start:error.start + 1].hex()}); "
            "convert the text to UTF-8"
        ) from None
    model, tokenizer, model_name = load_model(args.checkpoint, args.model, args.dtype, args.seed)
    tokens = tokenizer.encode(text)
    if tokens.size and int(tokens.max()) >= model.config.vocab_size:
        raise ValueError(
            f"the tokenizer produces token id {int(tokens.max())}, but the model's vocab_size is "
            f"{model.config.vocab_size}; use the checkpoint's own tokenizer.json"
        )
    prompts = split_prompts(tokens, args.prompt_tokens, args.sequences)
    needed = args.prompt_tokens + args.gen_tokens
    if needed > model.config.max_seq_len:
        raise ValueError(
            f"--prompt-tokens + --gen-tokens = {needed} exceeds the model's max_seq_len={model.config.max_seq_len}"
        )
    notes = f"text {text_path.name}; {args.sequences} x ({args.prompt_tokens} prompt + {args.gen_tokens} decode) tokens; greedy; dtype {model.config.dtype}"
    recorded = record_trace(
        model, prompts, args.gen_tokens, model_name=model_name, source=f"specmd-jax record ({args.checkpoint or 'preset ' + args.model})",
        notes=notes, progress=not args.quiet,
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_trace(recorded.trace, args.out)
    trace = recorded.trace
    print(f"wrote {trace.num_passes} passes, {trace.num_tokens} tokens ({trace.name}) to {args.out}")
    return 0
