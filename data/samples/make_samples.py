"""Write the bundled sample data: small, SYNTHETIC rows in the exact schemas of the real sources.

Every row is generated here from templates and a made-up fact table; nothing is copied from the real
datasets. The samples exist so that the offline demo, the tests and the notebooks run with no network.

    python data/samples/make_samples.py      # rewrites data/samples/<domain>/*.jsonl deterministically
"""

import json
import random
from pathlib import Path

SAMPLES_DIR = Path(__file__).resolve().parent
SYNTHETIC = "SYNTHETIC"  # every sample row carries this marker in a free-text field

# condition, presenting finding, first-line treatment, confirmatory test, organ system
MEDICAL_FACTS = [
    ("streptococcal pharyngitis", "fever and tonsillar exudate", "penicillin V", "rapid antigen test", "infectious"),
    ("community-acquired pneumonia", "productive cough and focal crackles", "amoxicillin", "chest radiograph",
     "respiratory"),
    ("iron deficiency anemia", "fatigue and spoon-shaped nails", "oral ferrous sulfate", "serum ferritin",
     "hematology"),
    ("hypothyroidism", "weight gain and cold intolerance", "levothyroxine", "serum TSH", "endocrine"),
    ("type 2 diabetes mellitus", "polyuria and polydipsia", "metformin", "HbA1c", "endocrine"),
    ("essential hypertension", "repeated elevated office readings", "a thiazide diuretic",
     "ambulatory blood pressure monitoring", "cardiovascular"),
    ("acute gout", "a hot swollen first toe joint", "colchicine", "joint aspiration for crystals", "rheumatology"),
    ("migraine", "unilateral throbbing headache with photophobia", "a triptan", "clinical diagnosis", "neurology"),
    ("asthma exacerbation", "wheeze and chest tightness", "inhaled salbutamol", "peak expiratory flow",
     "respiratory"),
    ("urinary tract infection", "dysuria and urinary frequency", "nitrofurantoin", "urine culture", "renal"),
    ("atrial fibrillation", "an irregularly irregular pulse", "a beta blocker for rate control",
     "electrocardiogram", "cardiovascular"),
    ("peptic ulcer disease", "epigastric pain relieved by meals", "a proton pump inhibitor",
     "upper endoscopy", "gastrointestinal"),
    ("anaphylaxis", "hypotension and urticaria after a bee sting", "intramuscular epinephrine",
     "serum tryptase", "immunology"),
    ("vitamin B12 deficiency", "paresthesia and macrocytosis", "intramuscular cyanocobalamin",
     "serum B12 level", "hematology"),
    ("hyperthyroidism", "tremor and heat intolerance", "methimazole", "free T4", "endocrine"),
    ("deep vein thrombosis", "a swollen tender calf", "low molecular weight heparin", "compression ultrasound",
     "hematology"),
    ("acute pancreatitis", "epigastric pain radiating to the back", "intravenous fluids", "serum lipase",
     "gastrointestinal"),
    ("cellulitis", "a warm spreading erythema of the leg", "cephalexin", "clinical diagnosis", "dermatology"),
    ("major depressive disorder", "low mood and anhedonia for weeks", "an SSRI", "a PHQ-9 questionnaire",
     "psychiatry"),
    ("scabies", "itching worse at night with burrows", "topical permethrin", "skin scraping", "dermatology"),
]
AGES = [19, 24, 31, 38, 45, 52, 58, 63, 70, 77]
SEXES = ["man", "woman"]
LETTERS = "ABCD"


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _options(rng: random.Random, answer: str, pool: list[str], n: int = 4) -> list[str]:
    distractors = rng.sample([p for p in pool if p != answer], n - 1)
    options = distractors + [answer]
    rng.shuffle(options)
    return options


def medqa_rows(rng: random.Random, n: int = 80) -> list[dict]:
    treatments = [f[2] for f in MEDICAL_FACTS]
    rows = []
    for i in range(n):
        condition, finding, treatment, _, system = MEDICAL_FACTS[i % len(MEDICAL_FACTS)]
        age, sex = rng.choice(AGES), rng.choice(SEXES)
        options = _options(rng, treatment, treatments)
        idx = options.index(treatment)
        rows.append({
            "question": f"A {age}-year-old {sex} presents with {finding}. The diagnosis is {condition}. "
                        "Which is the most appropriate first-line treatment?",
            "answer": treatment,
            "options": dict(zip(LETTERS, options, strict=True)),
            "meta_info": f"step2&3 ({SYNTHETIC})",
            "answer_idx": LETTERS[idx],
            "metamap_phrases": [f"{age}-year-old {sex}", finding, condition, "first-line treatment"],
        })
    return rows


def medmcqa_rows(rng: random.Random, n: int = 80) -> list[dict]:
    tests = [f[3] for f in MEDICAL_FACTS]
    rows = []
    for i in range(n):
        condition, finding, _, test, system = MEDICAL_FACTS[(i * 7) % len(MEDICAL_FACTS)]
        options = _options(rng, test, tests)
        explanation = rng.choice([f"{test.capitalize()} confirms {condition} ({SYNTHETIC}).", "", "None"])
        rows.append({
            "id": f"synthetic-{i:04d}",
            "question": f"Which investigation best confirms {condition} in a patient with {finding}?",
            "opa": options[0], "opb": options[1], "opc": options[2], "opd": options[3],
            # a few rows are unlabelled in the real data (cop = -1): the converter must drop and count them
            "cop": -1 if i % 25 == 24 else options.index(test),
            "choice_type": "single",
            "exp": explanation,
            "subject_name": system.capitalize(),
            "topic_name": None if i % 3 == 0 else f"{condition.capitalize()} ({SYNTHETIC})",
        })
    return rows


def pubmedqa_rows(rng: random.Random, n: int = 40) -> list[dict]:
    rows = []
    for i in range(n):
        condition, finding, treatment, _, system = MEDICAL_FACTS[i % len(MEDICAL_FACTS)]
        decision = ["yes", "no", "maybe"][i % 3]
        effect = {"yes": "reduced", "no": "did not change", "maybe": "may have reduced"}[decision]
        rows.append({
            "pubid": 90000000 + i,
            "question": f"Does {treatment} shorten symptom duration in {condition}?",
            "context": {
                "contexts": [
                    f"{SYNTHETIC} study. Adults with {condition} presenting with {finding} were enrolled.",
                    f"Patients receiving {treatment} were compared with usual care over four weeks.",
                ],
                "labels": ["BACKGROUND", "METHODS"],
                "meshes": [condition.title(), treatment.title(), "Humans"],
            },
            "long_answer": f"In this {SYNTHETIC} cohort, {treatment} {effect} the duration of symptoms.",
            "final_decision": decision,
        })
    return rows


def flashcard_rows(rng: random.Random, n: int = 80) -> list[dict]:
    rows = []
    for i in range(n):
        condition, finding, treatment, test, _ = MEDICAL_FACTS[i % len(MEDICAL_FACTS)]
        question, answer = rng.choice([
            (f"What is the first-line treatment for {condition}?", f"The first-line treatment is {treatment}."),
            (f"Which test confirms {condition}?", f"{test.capitalize()} confirms the diagnosis."),
            (f"What finding suggests {condition}?", f"{finding.capitalize()} suggests {condition}."),
        ])
        rows.append({
            "input": question,
            "output": f"{answer} ({SYNTHETIC})",
            "instruction": "Answer this question truthfully",
        })
    return rows


def main() -> None:
    rng = random.Random(1234)
    _write(SAMPLES_DIR / "medical" / "medqa.jsonl", medqa_rows(rng))
    _write(SAMPLES_DIR / "medical" / "medmcqa.jsonl", medmcqa_rows(rng))
    _write(SAMPLES_DIR / "medical" / "pubmedqa.jsonl", pubmedqa_rows(rng))
    _write(SAMPLES_DIR / "medical" / "flashcards.jsonl", flashcard_rows(rng))


if __name__ == "__main__":
    main()
