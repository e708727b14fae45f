"""The main job, an application of the library: the whole EMLoC method on one task, label
classification or generative data (``emloc finetune``).

- :mod:`.finetune`  the run: emulator, LoRA training (transformers' Trainer for generative data),
                    correction variants, report
- :mod:`.data`      the data formats (messages, prompt-completion, text, text-label): reading,
                    loss masks, held-out loss
- :mod:`.task`      label-word classification with a causal LM (encode, loss, accuracy)
- :mod:`.models`    model/tokenizer loading and the recipe's LoRA attachment (a leaf)
- :mod:`.memory`    peak memory of inference and fine-tuning, each in a fresh process
- :mod:`.demo`      the embedded default material (SmolLM2-135M-Instruct, Rotten Tomatoes)
- :mod:`.plan`      ``emloc plan``: fine-tuning memory from ``config.json``, the ratio that fits a budget
"""
