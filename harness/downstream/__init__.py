"""Downstream evaluation through lm-eval: the spliced model and the offline tasks."""
