"""Evaluation: the built-in video QA evaluator (`evaluator`), answer extraction (`answers`) and the
lmms-eval model (`lmms_eval_plugin`, needs the optional lmms-eval install)."""
