"""Stage 4, the model families: one adapter per family behind the interface of base.py (Hugging Face in hf.py,
fairseq in fairseq.py with its --user-dir plugin in fairseq_plugin/, Transformer-XL in transfo_xl.py), and
the registry that finds a model's family (families.py). Imports runtime, masks and stores."""
