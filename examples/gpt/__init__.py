"""The user's own GPT-style decoder on the user's own token file (byte-level: vocabulary 256).

From the repository root::

    python examples/gpt/make_tokens.py README.md /tmp/readme.bin && python -m launcher --gpus 2 model._target_=examples.gpt.model.GPT data._target_=examples.gpt.data.token_windows data.path=/tmp/readme.bin data.context=64 'model.context=${data.context}' data.batch_size=16 optimizer=adamw schedule=cosine trainer.max_steps=300

- ``make_tokens.py``: any text file -> a flat uint16 token file (one token per byte)
- ``data.py``: ``token_windows(path, context, eval_fraction, stride)``, read with numpy.memmap
- ``model.py``: ``GPT(vocab, context, layers, heads, width)``, a small pre-norm decoder

Pure command-line overrides: ``model._target_=…`` drops the preset's keys (those of the built-in MLP),
so only the keys given on the command line, plus the defaults of the class's signature, reach it.
"""  # noqa: E501 - the command is one line, to copy
