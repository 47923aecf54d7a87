"""Session hosting: what phone sessions (``xflwb.server``) and simulations
(``xflwb.simulation``) share, so neither imports the other.

The registry (``registry``; its tables in ``schema``, their versions in ``migrations``), the
session process's skeleton and recorders (``process``), session status, handle, manager and
end reasons (``status``, ``handle``, ``manager``, ``ending``), checkpoints, the ε ledger of
a model lineage (``lineage``), experiment tracking (``tracking``), the round options both
engines take (``options``) and the Flower ``Strategy`` adapter over the federation core that
their legacy transport drives (``flower_strategy``).
"""
