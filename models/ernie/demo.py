"""Build a small, UNTRAINED ERNIE model in PaddleNLP's export layout, for metering demos.

Called by tests and by operators (``python -m models.ernie.demo OUT_DIR``) who want an ``ernie`` model to serve without
downloading weights. The network has ERNIE's real architecture, written with
``paddle.nn`` (no paddlenlp needed in the serving venv): word + position + token-type
(+ task-type, as ERNIE 3.0) embeddings with LayerNorm, a post-LN Transformer encoder
(GELU), a tanh pooler over [CLS], and a linear classifier. Weights are random from
``seed``: token counts and shapes are real, labels and embeddings are meaningless.

Export: ONE program, ``paddle.jit.save`` -> ``inference.json`` (PIR) or
``inference.pdmodel`` + ``inference.pdiparams``, inputs ``input_ids`` and
``token_type_ids`` (int64, [batch, seq]), TWO outputs in this order: ``logits``
[batch, num_labels] and ``pooled_output`` [batch, hidden] (the embedding). The directory
also holds vocab.txt, tokenizer_config.json, special_tokens_map.json, config.json and
paddle_meter.json (label names, output order, the ``untrained`` flag; see
:mod:`models.ernie.export_layout`) which the adapter reads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from models.ernie.export_layout import META_FILE
from models.ernie.vocab import build_demo_vocab, write_tokenizer_files

__all__ = ["make_demo_ernie"]
_MAX_POSITIONS = 512
_TYPE_VOCAB = 4  # ERNIE 3.0's type_vocab_size
_TASK_TYPE_VOCAB = 3  # ERNIE 3.0's task_type_vocab_size (use_task_id)


def _build_network(vocab_size: int, hidden_size: int, layers: int, num_labels: int) -> Any:
    import paddle
    from paddle import nn

    heads = hidden_size // 16  # head size 16

    class ErnieEmbeddings(nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.word_embeddings = nn.Embedding(vocab_size, hidden_size, padding_idx=0)
            self.position_embeddings = nn.Embedding(_MAX_POSITIONS, hidden_size)
            self.token_type_embeddings = nn.Embedding(_TYPE_VOCAB, hidden_size)
            self.task_type_embeddings = nn.Embedding(_TASK_TYPE_VOCAB, hidden_size)
            self.layer_norm = nn.LayerNorm(hidden_size)
            self.dropout = nn.Dropout(0.1)

        def forward(self, input_ids: Any, token_type_ids: Any) -> Any:
            ones = paddle.ones_like(input_ids)
            position_ids = paddle.cumsum(ones, axis=-1) - ones
            task_type_ids = paddle.zeros_like(input_ids)  # task 0, as PaddleNLP defaults
            embeddings = (
                self.word_embeddings(input_ids)
                + self.position_embeddings(position_ids)
                + self.token_type_embeddings(token_type_ids)
                + self.task_type_embeddings(task_type_ids)
            )
            return self.dropout(self.layer_norm(embeddings))

    class ErnieForSequenceClassification(nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.embeddings = ErnieEmbeddings()
            layer = nn.TransformerEncoderLayer(
                hidden_size,
                heads,
                hidden_size * 4,
                dropout=0.1,
                activation="gelu",
                attn_dropout=0.1,
                act_dropout=0.0,
                normalize_before=False,  # post-LN, as ERNIE/BERT
            )
            self.encoder = nn.TransformerEncoder(layer, layers)
            self.pooler = nn.Linear(hidden_size, hidden_size)
            self.dropout = nn.Dropout(0.1)
            self.classifier = nn.Linear(hidden_size, num_labels)

        def forward(self, input_ids: Any, token_type_ids: Any) -> tuple[Any, Any]:
            # PaddleNLP's mask: -1e4 on [PAD] keys, broadcast over heads and queries.
            mask = (input_ids == 0).astype("float32").unsqueeze([1, 2]) * -1e4
            sequence = self.encoder(self.embeddings(input_ids, token_type_ids), mask)
            pooled = paddle.tanh(self.pooler(sequence[:, 0]))
            logits = self.classifier(self.dropout(pooled))
            return logits, pooled

    return ErnieForSequenceClassification()


def make_demo_ernie(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    num_labels: int = 2,
    hidden_size: int = 64,
    layers: int = 2,
    labels: list[str] | None = None,
) -> str:
    """Export an untrained ERNIE to ``out_dir`` (created; files overwritten). Blocks a few
    seconds. Returns a message saying what was built and how to serve it."""
    import paddle
    from paddle.static import InputSpec

    if num_labels < 1 or layers < 1 or hidden_size < 16 or hidden_size % 16:
        raise ValueError(
            "num_labels and layers must be >= 1 and hidden_size a positive multiple of 16"
        )
    if labels is None:
        labels = (
            ["negative", "positive"]
            if num_labels == 2
            else [f"label_{i}" for i in range(num_labels)]
        )
    if len(labels) != num_labels:
        raise ValueError(f"{len(labels)} labels given for num_labels={num_labels}")
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    tokens = build_demo_vocab()
    write_tokenizer_files(directory, tokens, do_lower_case=True, max_seq_len=_MAX_POSITIONS)

    paddle.seed(seed)
    network = _build_network(len(tokens), hidden_size, layers, num_labels)
    network.eval()
    spec = [
        InputSpec([None, None], "int64", name="input_ids"),
        InputSpec([None, None], "int64", name="token_type_ids"),
    ]
    static = paddle.jit.to_static(network, input_spec=spec, full_graph=True)
    paddle.jit.save(static, str(directory / "inference"))

    config = {
        "architectures": ["ErnieForSequenceClassification"],
        "model_type": "ernie",
        "vocab_size": len(tokens),
        "hidden_size": hidden_size,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden_size // 16,
        "intermediate_size": hidden_size * 4,
        "hidden_act": "gelu",
        "max_position_embeddings": _MAX_POSITIONS,
        "type_vocab_size": _TYPE_VOCAB,
        "task_type_vocab_size": _TASK_TYPE_VOCAB,
        "use_task_id": True,
        "pad_token_id": 0,
        "num_classes": num_labels,
        "id2label": dict(enumerate(labels)),
    }
    meta = {
        "model_type": "ernie",
        "untrained": True,
        "labels": labels,
        "outputs": ["logits", "pooled_output"],
        "max_position_embeddings": _MAX_POSITIONS,
        "seed": seed,
    }
    for name, data in (("config.json", config), (META_FILE, meta)):
        (directory / name).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return (
        f"Built an UNTRAINED demo ERNIE (random weights, seed {seed}; {layers} layers, hidden "
        f"{hidden_size}, {len(tokens)}-token vocabulary) in {directory}. Token counts are "
        f"exact and fine for metering; labels {labels} and embeddings are meaningless. "
        f"Serve it as an 'ernie' model with adapter options model_dir={str(directory)!r} "
        "and task 'text_classification' (logits) or 'embeddings' (pooled output)."
    )


if __name__ == "__main__":  # python -m models.ernie.demo OUT_DIR
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m models.ernie.demo OUT_DIR")
    print(make_demo_ernie(sys.argv[1]))
