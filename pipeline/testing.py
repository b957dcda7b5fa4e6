"""Tiny, fully local model checkpoints for tests: a random Llama saved as sharded safetensors with a real tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

_CORPUS = [
    "In the beginning was the word, and the word was with the model.",
    "The quick brown fox jumps over the lazy dog while the cache compresses keys and values.",
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
    "Attention is all you need, but a smaller cache is what you can afford.",
    "Numbers like 0 1 2 3 4 5 6 7 8 9 and punctuation, too: (a) [b] {c}; d! e?",
]
_SPECIALS = ["<unk>", "<s>", "</s>"]


def tiny_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained locally on a few sentences; encodes any text, ``len <= vocab``."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def write_tiny_llama(
    dest: str | Path,
    num_layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 320,
    shards: int = 2,
    seed: int = 0,
    max_positions: int = 256,
    init_std: float = 0.02,
) -> Path:
    """Save a randomly initialised ``LlamaForCausalLM`` (float32) and a fitting tokenizer to ``dest``.

    ``init_std`` is the weights' standard deviation: the default (transformers') gives near-uniform attention and
    predictions, where cache errors barely move perplexity; ~0.2 makes attention sharp enough for them to show.

    With ``shards > 1`` the weights are split into (at most, and for the defaults exactly) that many
    safetensors files plus ``model.safetensors.index.json``. ``vocab`` must exceed 259 (byte alphabet + specials).
    """
    dest = Path(dest)
    tokenizer = tiny_tokenizer(vocab)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        initializer_range=init_std,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    sizes = [t.numel() * t.element_size() for t in model.state_dict().values()]
    # greedy packing closes a shard only past this size, so it yields at most `shards` files
    model.save_pretrained(dest, max_shard_size=-(-sum(sizes) // shards) + max(sizes))
    tokenizer.save_pretrained(dest)
    return dest


def poison_values(checkpoint: object, layer: int) -> None:
    """Make ``checkpoint.load_layer`` put a NaN into ``layer``'s value projection (for NaN-handling tests)."""
    load = checkpoint.load_layer

    def poisoned(i: int, *args: object) -> object:
        module = load(i, *args)
        if i == layer:
            module.self_attn.v_proj.weight[0, 0] = float("nan")
        return module

    checkpoint.load_layer = poisoned
