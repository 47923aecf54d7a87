"""Session hosting shared by phone sessions (``xflwb.server``) and simulations
(``xflwb.simulation``): what both engines need to run rounds of the federation core,
including the Flower ``Strategy`` adapter their legacy transport drives."""
