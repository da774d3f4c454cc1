"""ERNIE sequence classification / embedding models (PaddleNLP export layout).

``tokenizer`` counts billed tokens exactly as PaddleNLP's ErnieTokenizer; ``adapter``
serves an exported model; ``batcher`` groups concurrent requests; ``demo`` builds a small
untrained model for metering tests and demos; ``export_layout`` names the side file the
adapter reads next to PaddleNLP's files.
"""
