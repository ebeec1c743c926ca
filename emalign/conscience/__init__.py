"""The conscience wing: a frozen copy of the model reviews its own answers, and what is built on that.

:mod:`~emalign.conscience.verdict` asks the one question and scores the answer (``Conscience``) and
turns scored rollouts into pairs (``PairBuilder``); :mod:`~emalign.conscience.step` runs one conscience
step (sample, review, revise, pair); :mod:`~emalign.conscience.prompts` says where its prompts come from;
:mod:`~emalign.conscience.guard` keeps incoherent text from winning; :mod:`~emalign.conscience.controls`
holds the control verdicts (``CautionControl``, ``ShuffledControl``); :mod:`~emalign.conscience.decoding`
is the conscience at inference (``ConscienceDecoder``).
"""
