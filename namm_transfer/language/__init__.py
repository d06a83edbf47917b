"""Language side: offline model loading, long-memory tasks built from stdlib text, LongBench loading + metrics."""
from .models import cache_dir, convert_smollm2, load_causal_lm, tiny_random_lm, tiny_tokenizer
from .tasks import (DEFAULT_STYLE, SPLITS, TASKS, AnswerLogProb, TaskSample, answer_loglik,
                    answer_logprob_from_logits, char_accuracy, encode_prompt_answer, exact_match, make_sample,
                    make_split, score_generation, split_seeds)

__all__ = ["cache_dir", "convert_smollm2", "load_causal_lm", "tiny_random_lm", "tiny_tokenizer", "DEFAULT_STYLE",
           "SPLITS", "TASKS", "AnswerLogProb", "TaskSample", "answer_loglik", "answer_logprob_from_logits",
           "char_accuracy", "encode_prompt_answer", "exact_match", "make_sample", "make_split", "score_generation",
           "split_seeds"]
