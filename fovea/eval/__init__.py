"""Evaluation of BLIP-2 models: retrieval recall@k (ITC, then ITM re-ranking), captioning (BLEU-4, CIDEr-D,
exact match) and VQA accuracy, each with its chance level. `python -m fovea.eval {retrieval,caption,vqa}`."""
