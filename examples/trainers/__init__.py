"""Schedule-Free through the trainers people already use: transformers' Trainer
(``hf_trainer.py``) and Lightning (``lightning_*.py``); one file each, plain flags."""
