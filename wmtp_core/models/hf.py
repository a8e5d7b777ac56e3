"""A Hugging Face causal LM as the WMTP trunk, with multi-token heads attached Meta-style (Gloeckle et al. 2024,
"Better & Faster LLMs via Multi-token Prediction").

The LM's decoder layers but the last are the shared trunk. Head 0 is the LM itself from there on (its last layer,
final norm and unembedding), so head 0 is exactly the model's own next-token prediction. Heads 1..K-1 are extra
decoder layers of the same class that read the trunk's output and share the final norm and unembedding. They start
as copies of the last layer, or, for a model that already has them, are loaded as they are from
`mtp_heads.safetensors` beside its weights (what export_pretrained writes).

The extra heads are called with the very arguments the LM passes its last layer (attention mask, rotary position
embeddings, ...), recorded by a forward pre-hook, so no architecture's forward is re-implemented here.
transformers is imported only when a model is loaded: the built-in model never needs it.
Shapes: B batch, T time, D hidden size, K heads, V vocabulary.
"""

from __future__ import annotations

import copy
import logging
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from wmtp_core.models.heads import HeadLoss, reduce_heads_one_at_a_time
from wmtp_core.models.hf_tokenizer import HFTokenizer, import_transformers
from wmtp_core.models.kv_cache import HFKVCache
from wmtp_core.models.transformer import ValueHead, frozen_trunk_values

log = logging.getLogger(__name__)
MTP_HEADS_FILE = "mtp_heads.safetensors"
HF_EXPORT_DIR = "hf"  # inside a checkpoint directory: the trunk as save_pretrained writes it


class HFMTPModel(nn.Module):
    """forward(tokens_BT) -> logits_BTKV like MTPTransformer: head k at position t predicts token t + k + 1.

    `lm` is the AutoModelForCausalLM (its state-dict keys under `lm.` are the exported trunk's), `extra_heads` the
    decoder layers of heads 1..K-1, `value_head` critic-wmtp's value estimate from the trunk's hidden state.
    """

    def __init__(self, lm: nn.Module, *, extra_heads: nn.ModuleList, with_value_head: bool, max_seq_len: int):
        super().__init__()
        self.lm = lm
        self.extra_heads = extra_heads
        hidden_size = lm.get_input_embeddings().embedding_dim
        self.value_head = ValueHead(hidden_size) if with_value_head else None
        self.max_seq_len = max_seq_len
        # Paths, not module attributes: a second reference would put the same weights in the state dict twice.
        self._layers_path = _decoder_layers_path(lm)
        self._final_norm_path = _final_norm_path(lm)

    @property
    def horizon(self) -> int:
        return 1 + len(self.extra_heads)

    def decoder_layers(self) -> nn.ModuleList:
        return self.lm.get_submodule(self._layers_path)

    def transformer_blocks(self) -> list[nn.Module]:
        """The LM's decoder layers, then the extra heads (wmtp_core.runtime.blocks.BlockModel: FSDP shards each one,
        then the root holds the embeddings, final norm, unembedding and value head)."""
        return [*self.decoder_layers(), *self.extra_heads]

    def full_precision_modules(self) -> list[nn.Module]:
        """The value head, if any: it computes in fp32 under any mixed precision (BlockModel)."""
        return [self.value_head] if self.value_head is not None else []

    def head_blocks(self) -> list[nn.Module]:
        """The decoder layers only the extra heads run (forward(head_loss=...) recomputes them one head at a time;
        head 0's layer is the LM's last, run with the trunk)."""
        return list(self.extra_heads)

    def forward(
        self,
        tokens_BT: torch.Tensor,
        *,
        return_values: bool = False,
        values_only: bool = False,
        head_loss: HeadLoss | None = None,
    ):
        """logits_BTKV; (logits_BTKV, values_BT) with return_values; values_only: values_BT alone, the trunk run
        without gradient (critic-wmtp's Stage 1). The values read the trunk's output, the heads' input. With
        head_loss, loss_BTK in place of logits_BTKV, the heads computed one at a time (wmtp_core.models.heads)."""
        if values_only:
            return frozen_trunk_values(self, tokens_BT)
        self._check_length(tokens_BT)
        if head_loss is not None:
            out, last_layer = self._head_losses(tokens_BT, head_loss)
        else:
            with _LayerCall(self.decoder_layers()[-1]) as last_layer:
                head0_BTV = self.lm(input_ids=tokens_BT, use_cache=False).logits
            logits = [head0_BTV] + [self._head_logits(head, last_layer) for head in self.extra_heads]
            out = torch.stack(logits, dim=2)
        return (out, self.value_head(last_layer.hidden_BTD)) if return_values else out

    def _head_losses(self, tokens_BT: torch.Tensor, head_loss: HeadLoss) -> tuple[torch.Tensor, _LayerCall]:
        """loss_BTK one head at a time: head 0 unembeds the LM's final hidden state (what its own forward does for
        Llama, GPT-2 and their kin), the extra heads run from the trunk's output."""
        with _LayerCall(self.decoder_layers()[-1]) as last_layer:
            final_BTD = self.lm.base_model(input_ids=tokens_BT, use_cache=False).last_hidden_state
        heads = [(self.lm.get_output_embeddings(), final_BTD)]
        heads += [(partial(self._head_logits, head, last_layer), last_layer.hidden_BTD) for head in self.extra_heads]
        return reduce_heads_one_at_a_time(heads, head_loss), last_layer

    def trunk_hidden(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        """The shared trunk's last hidden state h_BTD (the input of every head)."""
        self._check_length(tokens_BT)
        with _LayerCall(self.decoder_layers()[-1]) as last_layer:
            self.lm.base_model(input_ids=tokens_BT, use_cache=False)
        return last_layer.hidden_BTD

    def new_cache(self) -> HFKVCache:
        """An empty cache for decode(): the LM's own and one per extra head."""
        return HFKVCache(self.lm, num_extra_heads=len(self.extra_heads))

    @torch.no_grad()
    def decode(
        self, tokens_BT: torch.Tensor, cache: HFKVCache, *, num_heads: int, last_only: bool = False
    ) -> torch.Tensor:
        """logits_BTKV of heads 0..num_heads-1 for tokens_BT, which continue the cache's sequence (inference only);
        with last_only, logits_B1KV of the last position (the layers still run on every position, for the caches;
        the extra heads skip the final norm and unembedding of the others; head 0's come from the LM's own forward).

        The LM reads and extends its own cache; each extra head gets the arguments the LM gave its last layer with
        its own cache in place of the LM's (the attention mask and positions fit both: every cache is as long).
        """
        if cache.length + tokens_BT.shape[1] > self.max_seq_len:
            raise ValueError(
                f"decoding to {cache.length + tokens_BT.shape[1]} tokens exceeds model.max_seq_len={self.max_seq_len}"
            )
        with _LayerCall(self.decoder_layers()[-1]) as last_layer:
            head0_BTV = self.lm(input_ids=tokens_BT, use_cache=True, **{cache.keyword: cache.trunk}).logits
        keep = slice(-1, None) if last_only else slice(None)
        heads = zip(self.extra_heads[: num_heads - 1], cache.heads)
        logits = [head0_BTV[:, keep]]
        logits += [self._head_logits(head, last_layer, swap=(cache.trunk, own), keep=keep) for head, own in heads]
        return torch.stack(logits, dim=2)

    def _head_logits(
        self,
        head: nn.Module,
        last_layer: _LayerCall,
        hidden_BTD: torch.Tensor | None = None,
        swap: tuple = (None, None),
        keep: slice = slice(None),
    ) -> torch.Tensor:
        """One extra head's logits from hidden_BTD (default: the trunk's output the LM gave its last layer), at the
        positions `keep` selects."""
        hidden_BTD = last_layer.hidden_BTD if hidden_BTD is None else hidden_BTD
        h_BTD = last_layer.call(head, hidden_BTD, swap=swap)[:, keep]
        final_norm = self.lm.get_submodule(self._final_norm_path)
        return self.lm.get_output_embeddings()(final_norm(h_BTD))

    def _check_length(self, tokens_BT: torch.Tensor) -> None:
        if tokens_BT.shape[1] > self.max_seq_len:
            raise ValueError(f"sequence of {tokens_BT.shape[1]} tokens exceeds model.max_seq_len={self.max_seq_len}")


class _LayerCall:
    """Records the positional and keyword arguments a layer is called with, to call other layers the same way."""

    def __init__(self, layer: nn.Module):
        self.layer = layer
        self.args: tuple = ()
        self.kwargs: dict = {}

    def __enter__(self) -> _LayerCall:
        # First of the layer's pre-hooks: it records the arguments as the model passes them, before FSDP2's own
        # pre-forward hook turns them into autograd views (returned from the root, FSDP2 warns about those).
        self._handle = self.layer.register_forward_pre_hook(self._record, with_kwargs=True, prepend=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def _record(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.args, self.kwargs = args, kwargs

    @property
    def hidden_BTD(self) -> torch.Tensor:
        """The layer's input hidden state."""
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def call(self, layer: nn.Module, hidden_BTD: torch.Tensor, *, swap: tuple = (None, None)) -> torch.Tensor:
        """layer(hidden_BTD, the recorded arguments), with the argument that is swap[0] (a cache, whatever the
        architecture names it or wherever it passes it) replaced by swap[1]."""
        old, new = swap
        args = [new if old is not None and arg is old else arg for arg in self.args[1:]]
        kwargs = {name: new if old is not None and arg is old else arg for name, arg in self.kwargs.items()}
        if self.args:
            out = layer(hidden_BTD, *args, **kwargs)
        else:
            out = layer(**{**kwargs, "hidden_states": hidden_BTD})
        return out[0] if isinstance(out, tuple) else out  # older layers return (hidden, attention weights, ...)


def load_hf_mtp_model(
    path: str, *, horizon: int, max_seq_len: int, with_value_head: bool = False, dtype: torch.dtype = torch.float32
) -> HFMTPModel:
    """The causal LM at path (local directory or hub id) with horizon - 1 extra heads, weights in dtype.

    Trained models load in fp32 (the master weights; autocast computes in the plan's dtype); a frozen reference
    can load in the compute dtype to halve its memory.
    """
    transformers = import_transformers()
    lm = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    _check_positions(lm, path, max_seq_len)
    extra_heads = _extra_heads(lm, path, count=horizon - 1)
    return HFMTPModel(lm, extra_heads=extra_heads.to(dtype), with_value_head=with_value_head, max_seq_len=max_seq_len)


def hf_mtp_skeleton(path: str, *, horizon: int, max_seq_len: int, with_value_head: bool = False) -> HFMTPModel:
    """The module tree load_hf_mtp_model builds (fp32), on the meta device: every shape and tie, no weights, and
    nothing read from path but its config. Filled later from full weights held elsewhere (another rank's)."""
    transformers = import_transformers()
    config = transformers.AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        lm = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        _check_positions(lm, path, max_seq_len)
        last = lm.get_submodule(_decoder_layers_path(lm))[-1]
        extra_heads = nn.ModuleList(copy.deepcopy(last) for _ in range(horizon - 1))
        return HFMTPModel(lm, extra_heads=extra_heads, with_value_head=with_value_head, max_seq_len=max_seq_len)


def _check_positions(lm: nn.Module, path: str, max_seq_len: int) -> None:
    positions = getattr(lm.config, "max_position_embeddings", None)
    if positions is not None and max_seq_len > positions:
        raise ValueError(f"model.max_seq_len={max_seq_len} exceeds the {positions} positions of {path}; lower it")


def _extra_heads(lm: nn.Module, path: str, *, count: int) -> nn.ModuleList:
    last = lm.get_submodule(_decoder_layers_path(lm))[-1]
    heads = nn.ModuleList(copy.deepcopy(last) for _ in range(count))
    saved_file = Path(path) / MTP_HEADS_FILE
    if count == 0 or not saved_file.is_file():
        if count:
            log.info("%s: %d extra MTP heads initialised as copies of its last decoder layer", path, count)
        return heads
    saved = load_file(saved_file)
    available = len({name.split(".", 1)[0] for name in saved})
    if count > available:
        raise ValueError(f"{saved_file} holds {available} extra heads, so model.horizon can be at most {available + 1}")
    state = {name: tensor for name, tensor in saved.items() if int(name.split(".", 1)[0]) < count}
    heads.load_state_dict(state)
    log.info("%s: %d extra MTP heads loaded from %s", path, count, MTP_HEADS_FILE)
    return heads


def export_pretrained(model: HFMTPModel, tokenizer: HFTokenizer, checkpoint_dir: Path, model_state: dict) -> None:
    """Write checkpoint_dir/hf/ from the full model state (see save_mtp_pretrained)."""
    save_mtp_pretrained(model, tokenizer, Path(checkpoint_dir) / HF_EXPORT_DIR, model_state)


def save_mtp_pretrained(model: HFMTPModel, tokenizer: HFTokenizer, out: Path, model_state: dict) -> None:
    """Write into out, from the full model state: the trunk with its next-token head as save_pretrained writes it
    (AutoModelForCausalLM.from_pretrained loads it), its tokenizer, and the extra heads in mtp_heads.safetensors
    (so model.path=<out> trains on with every head)."""
    lm_state = {name.removeprefix("lm."): t for name, t in model_state.items() if name.startswith("lm.")}
    heads_state = {
        name.removeprefix("extra_heads."): t.contiguous()
        for name, t in model_state.items()
        if name.startswith("extra_heads.")
    }
    model.lm.save_pretrained(out, state_dict=lm_state)
    tokenizer.tokenizer.save_pretrained(out)
    if heads_state:
        save_file(heads_state, out / MTP_HEADS_FILE)


def _decoder_layers_path(lm: nn.Module) -> str:
    """Where the LM keeps its decoder layers: the ModuleList of config.num_hidden_layers no-split blocks."""
    count = lm.config.num_hidden_layers
    block_names = set(getattr(lm, "_no_split_modules", None) or ())
    for name, module in lm.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count and count > 0:
            if not block_names or type(module[0]).__name__ in block_names:
                return name
    raise ValueError(
        f"no list of {count} decoder layers found in {type(lm).__name__}; WMTP attaches heads to "
        "decoder-only causal LMs (Llama, Mistral, Qwen, GPT-2, ...)"
    )


def _final_norm_path(lm: nn.Module) -> str:
    """The norm the base model applies after its last layer (Llama's `norm`, GPT-2's `ln_f`, ...)."""
    norms = [name for name, child in lm.base_model.named_children() if "norm" in type(child).__name__.lower()]
    if len(norms) != 1:
        raise ValueError(
            f"{type(lm).__name__}: expected one final norm module beside the decoder layers, found "
            f"{norms or 'none'}; this architecture is not supported as a WMTP trunk"
        )
    return f"{lm.base_model_prefix}.{norms[0]}"
