"""The data wing: chat data for training, the embedded offline data sets, and the upstream download.

:mod:`~emalign.data.chat` turns chat JSONL into training examples (``ChatDataModule``);
:mod:`~emalign.data.embedded` holds the small embedded code-task data set (its files are under
``emalign/resources/``); :mod:`~emalign.data.download` fetches and checksums the Emergent-Misalignment
files.
"""
