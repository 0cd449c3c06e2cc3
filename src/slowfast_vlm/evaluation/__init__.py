"""Evaluation: the built-in video QA evaluator (`evaluator`: the loop and `slowfast-vlm eval`; its data
`dataset`, predictions files `predictions`, scoring `scoring` and answer extraction `answers`) and
the lmms-eval model (`lmms_eval_plugin`, needs the optional lmms-eval install)."""
