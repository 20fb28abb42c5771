"""Train stage: DPO on one round's pairs with DeepSpeed -> the round's Hugging Face checkpoint.

Modules: cli (command line), train (the stage), data (pairs -> tokens -> batches),
loss (DPO, log-probs), reference (reference log-probs, once), schedule (lr and pair
order), dsconfig (DeepSpeed config), checkpoint (saving), forward (one model pass).
"""
