"""The offline preference stage (DPO, KTO, ORPO, CPO, SimPO): `args` (the flags) and `train` (`run_dpo`)."""
