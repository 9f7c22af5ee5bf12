"""Corpora -> byte-level BPE tokenizer -> packed memory-mapped token shards -> a resumable DataModule.

Modules (one job each):

- :mod:`data.sources`     read documents (stdlib, text, json/jsonl/parquet/csv, HF hub) in a fixed order
- :mod:`data.split`       deterministic train/validation/test assignment by document
- :mod:`data.tokenizer`   train / load a byte-level BPE, its special-token ids and sha256
- :mod:`data.encode`      batch documents and encode them in parallel (tokens + end-of-document)
- :mod:`data.shards`      write and read packed ``.npy`` shards, ``metadata.json``, compatibility checks
- :mod:`data.atomic`      build an output directory in a temporary sibling, rename it into place
- :mod:`data.fingerprint` the hash that decides whether a prepared directory is up to date
- :mod:`data.prepare`     ``lm data prepare``: the whole pipeline
- :mod:`data.inspect`     ``lm data inspect``: counts and a decoded sample
- :mod:`data.dataset`     fixed-length windows over a split
- :mod:`data.sampler`     shuffled, rank-sharded, resumable batch samplers
- :mod:`data.datamodule`  :class:`~data.datamodule.TokenDataModule` (Lightning)
- :mod:`data.bench`       ``python -m data.bench``: tokenization throughput

(:mod:`data.tasks` holds the synthetic tasks, generated on the fly instead of prepared.)

Nothing heavy is imported here, so ``import data.shards`` stays cheap.
"""
