# The README's commands. Each one sets up .venv on first use (see scripts/setup.sh).
.PHONY: run test lab
run:   ## the main job: closed-form checks and the guided-sampling demo -> figures/
	bash scripts/setup.sh run
test:  ## the whole test suite (notebooks at smoke scale, browser test included)
	bash scripts/setup.sh test
lab:   ## open the course in JupyterLab
	bash scripts/setup.sh lab
