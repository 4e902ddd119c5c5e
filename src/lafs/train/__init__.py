"""Training: the shared loop, distributed set-up and logging (the checkpoint format is ``lafs.checkpoint``)."""
