"""A small, real byte-level BPE tokenizer with a hermes-style tool-calling chat template.

Production runs use the model's own tokenizer (e.g. Qwen2.5-7B-Instruct). This one exists so
that every stage can run offline on embedded defaults (the local demo, CI): it is trained on the
bundled sample data in well under a second, speaks the same ChatML + ``<tool_call>`` format as
Qwen2.5, and renders each message independently so verl's ``MultiTurnSFTDataset`` (which
tokenizes turn by turn) gets the same ids as a whole-conversation render.

CLI: ``python -m recipe.retool.dev.tokenizer OUT_DIR`` writes a ``save_pretrained`` directory.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from recipe.retool import SAMPLE_DATA_DIR

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# As in Qwen2.5's tokenizer: single tokens, but not special, so decoding with
# skip_special_tokens=True (what verl does before scoring) keeps them in the text.
TOOL_TAGS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Our own ChatML/hermes template. Every message renders on its own (no grouping of consecutive
# tool messages), and a conversation without a system message gets the default one, as Qwen2.5's does.
CHAT_TEMPLATE = r"""
{%- set ns = namespace(system=none) -%}
{%- if messages and messages[0]['role'] == 'system' -%}{%- set ns.system = messages[0]['content'] -%}{%- endif -%}
<|im_start|>system
{{ ns.system if ns.system is not none else '""" + DEFAULT_SYSTEM_PROMPT + r"""' }}
{%- if tools %}{{ '\n\n' }}# Tools

You may call one or more functions to assist with the user query.

Function signatures are given inside <tools></tools>:
<tools>
{%- for tool in tools %}
{{ (tool['function'] if 'function' in tool else tool) | tojson }}
{%- endfor %}
</tools>

For each function call, answer with a JSON object holding the function name and arguments inside <tool_call></tool_call> tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call>
{%- endif %}<|im_end|>
{% for message in messages -%}
{%- if message['role'] == 'system' -%}
{%- elif message['role'] == 'tool' -%}
<|im_start|>user
<tool_response>
{{ message['content'] }}
</tool_response><|im_end|>
{% elif message['role'] == 'assistant' -%}
<|im_start|>assistant
{{ message['content'] or '' }}
{%- for call in (message['tool_calls'] or []) %}
{%- set fn = call['function'] if 'function' in call else call %}
{{ '\n' }}<tool_call>
{"name": "{{ fn['name'] }}", "arguments": {{ fn['arguments'] if fn['arguments'] is string else (fn['arguments'] | tojson) }}}
</tool_call>
{%- endfor %}<|im_end|>
{% else -%}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<|im_start|>assistant
{% endif -%}
"""


def _sample_texts() -> Iterator[str]:
    """Yield text from the bundled sample data (our training corpus for the BPE merges)."""
    for path in sorted(SAMPLE_DATA_DIR.glob("*.jsonl")):
        with path.open() as fh:
            yield from fh


def build_dev_tokenizer(vocab_size: int = 2048, corpus: Iterable[str] | None = None):
    """Train a byte-level BPE tokenizer and wrap it as a ``PreTrainedTokenizerFast``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    # Digits one token each, as in Qwen2.5's tokenizer (numbers then read and copy digit by digit).
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = list(corpus) if corpus is not None else list(_sample_texts())
    texts.append(CHAT_TEMPLATE)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in TOOL_TAGS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 1 << 20
    return fast


def save_dev_tokenizer(out_dir: str | Path, vocab_size: int = 2048) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_dev_tokenizer(vocab_size).save_pretrained(str(out))
    # Record how the directory was made, so a reader can tell it from a real model tokenizer.
    (out / "DEV_TOKENIZER.json").write_text(json.dumps({"vocab_size": vocab_size, "built_by": __name__}))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="directory to write the tokenizer to (save_pretrained layout)")
    p.add_argument("--vocab-size", type=int, default=2048)
    args = p.parse_args(argv)
    print(save_dev_tokenizer(args.out_dir, args.vocab_size))


if __name__ == "__main__":
    main()


def save_tiny_qwen2(out_dir: str | Path, tokenizer, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                    kv_heads: int = 2, seed: int = 0) -> Path:
    """A random-init Qwen2-architecture model with ``tokenizer`` saved beside it (no hub): for tests and
    the miniature GRPO run."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=4096, tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    Qwen2ForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
