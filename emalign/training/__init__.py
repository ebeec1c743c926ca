"""The training wing: the LightningModule and what a fit needs around it.

:mod:`~emalign.training.module` is the LightningModule (``EmergentAlignment``) and its learning-rate
schedule (``WarmupCosine``); :mod:`~emalign.training.losses` the preference losses;
:mod:`~emalign.training.pair_queue` the queue of pairs waiting to be trained on;
:mod:`~emalign.training.checkpoint` atomic, checked checkpoints; :mod:`~emalign.training.model_card`
the model card saved with every adapter.
"""
