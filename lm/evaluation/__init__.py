"""Evaluation of trained checkpoints.

* :mod:`~lm.evaluation.ppl`: perplexity and bits per byte of whole documents, loss by position
  (state carried for the recurrent families, sliding windows for the Transformer);
* :mod:`~lm.evaluation.icl`: the synthetic in-context-learning suite (recall, induction, ICL
  regression, formal languages, the LM in-context-learning score);
* :mod:`~lm.evaluation.harness`: the lm-evaluation-harness model ``rnn-lm`` (optional extra ``eval``);
* :mod:`~lm.evaluation.generate` and :mod:`~lm.evaluation.sampling`: streamed generation;
* :mod:`~lm.evaluation.bench_generate`: decode latency and memory against context length;
* :mod:`~lm.evaluation.common`, :mod:`~lm.evaluation.plots`: checkpoint loading, state surgery,
  atomic result files, figures.
"""
