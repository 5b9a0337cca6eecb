"""`rlhf pipeline RECIPE.yaml`: the whole recipe (sft -> reward -> stage 3 -> eval -> report, in rounds) as one
resumable command; see `rlhf_cli.pipeline.run`."""
