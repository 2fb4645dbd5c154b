"""The StableLLaVA recipe (papers/stablellava_v2.txt, templates in stablellava_v1_with_templates.txt).

abilities  the 13 ability data files (synthvlm/data/abilities/*.yaml) and their pydantic loader
emphasis   SD prompt syntax: keywords, ((emphasis)), the plain prompt diffusers gets
keywords   LLM keyword banks per ability
prompts    the Fig. 4 / Fig. 7 prompt templates and the in-context example pool
filters    prompt and dialogue filters, train/eval keyword matching
dialogues  caption, Q&A, multi-turn, multi-image and eval dialogue templates and schemas
export     LLaVA JSON samples and eval rows
templates  offline generators for the "template" LLM backend

The stage functions are in synthvlm.stages.stablellava.
"""
