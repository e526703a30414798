"""Task formats and their readers, apart from scoring (:mod:`segmask.scoring`) and run bookkeeping
(:mod:`segmask.results`).

    commonsense  the LLM-Adapters commonsense suite: records, answer vocabularies, candidates, answers
    babi         the bAbI QA tasks (v1.2) as stories with one question each, or one chat per story
    reading      a built-in, seeded bAbI-like reading task and its record and chat exports
    gym          reasoning-gym items (optional package) split into passage and question, as records
"""
