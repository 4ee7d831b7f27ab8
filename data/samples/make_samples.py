"""Write the bundled sample data: small, SYNTHETIC rows in the exact schemas of the real sources.

Every row is generated here from templates and a made-up fact table; nothing is copied from the real
datasets. The samples exist so that the offline demo, the tests and the notebooks run with no network.

    python data/samples/make_samples.py      # rewrites data/samples/<domain>/* deterministically
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


# Legal: a made-up rule, the holding a court would cite for it, a topic tag and a jurisdiction tag
LEGAL_FACTS = [
    ("a landlord may deduct ordinary wear and tear from a security deposit",
     "holding that ordinary wear and tear is not damage a landlord may deduct from a deposit", "landlord", "oregon"),
    ("an oral promise to sell land is enforceable",
     "holding that a contract for the sale of land must be in writing to be enforced", "contract-law", "texas"),
    ("an employer may withhold a final paycheck until equipment is returned",
     "holding that final wages are due on the next regular payday regardless of unreturned equipment",
     "employment", "california"),
    ("a shop owner is liable for a spill that appeared seconds before a fall",
     "holding that an owner is liable only for hazards it knew of or had time to discover", "negligence",
     "florida"),
    ("a police officer may search a locked car trunk during a traffic stop without cause",
     "holding that searching a locked trunk requires probable cause or consent", "criminal-procedure",
     "united-states"),
    ("a tenant may withhold rent without notice when the heating fails",
     "holding that rent may be withheld only after written notice and a reasonable time to repair", "landlord",
     "new-york"),
    ("a website may reuse a photograph because it was posted publicly",
     "holding that public posting does not license copying a copyrighted photograph", "copyright", "united-states"),
    ("a will signed without witnesses is valid",
     "holding that a typed will is void unless signed before two attesting witnesses", "wills", "england-and-wales"),
    ("a seller may keep a deposit as a penalty far above the actual loss",
     "holding that a liquidated damages clause that is a penalty is unenforceable", "contract-law", "canada"),
    ("a driver who was rear-ended is presumed at fault",
     "holding that the following driver is presumed negligent in a rear-end collision", "traffic", "new-jersey"),
    ("a minor's contract for a car is binding on the minor",
     "holding that a minor may disaffirm a contract that is not for necessaries", "contract-law", "ohio"),
    ("an employee may be fired for discussing wages with coworkers",
     "holding that discussing pay with coworkers is protected concerted activity", "employment", "united-states"),
    ("a neighbour's tree roots crossing the boundary may be cut back at the line",
     "holding that a landowner may trim encroaching roots at the boundary at their own expense", "property",
     "australia"),
    ("a verbal warning is enough to evict a tenant",
     "holding that eviction requires written notice served as the statute prescribes", "landlord", "scotland"),
    ("a company may keep customer data forever once consent was given",
     "holding that personal data may be kept no longer than the purpose requires", "privacy", "european-union"),
    ("a guest who is bitten by a dog has no claim against its owner",
     "holding that a dog owner is strictly liable for a bite to a lawful visitor", "torts", "michigan"),
]
CASE_NAMES = ["Harlow v. Brandt", "Mercer v. Quill Holdings", "State v. Okafor", "Lindqvist v. Ferro",
              "Doyle v. Northgate Properties", "In re Estate of Vance", "Pruitt v. Calder", "Osei v. Marlow Foods"]
LETTERS5 = "ABCDE"


def case_hold_rows(rng: random.Random, n: int = 80) -> list[dict]:
    holdings = [f[1] for f in LEGAL_FACTS]
    rows = []
    for i in range(n):
        claim, holding, _, _ = LEGAL_FACTS[i % len(LEGAL_FACTS)]
        endings = _options(rng, holding, holdings, n=5)
        rows.append({
            "context": f"{SYNTHETIC} opinion excerpt. The appellant argues that {claim}. We disagree, as our "
                       f"precedent is settled on this point. See {rng.choice(CASE_NAMES)}, {rng.randint(100, 999)} "
                       f"F.3d {rng.randint(1, 1400)} ({rng.choice(['2d', '5th', '9th', '11th'])} Cir. "
                       f"{rng.randint(1985, 2019)}) (<HOLDING>). The judgment is affirmed.",
            "endings": endings,
            "label": endings.index(holding),
        })
    return rows


ASKERS = ["a friend", "my neighbour", "my landlord", "a coworker", "my cousin", "a forum post", "my manager"]


def law_stackexchange_rows(rng: random.Random, n: int = 60) -> list[dict]:
    rows = []
    for i in range(n):
        claim, holding, area, place = LEGAL_FACTS[i % len(LEGAL_FACTS)]
        asker = ASKERS[i % len(ASKERS)]
        rule = holding.removeprefix("holding that ")
        answers = [
            {"answer_id": 500000 + 3 * i, "score": rng.randint(0, 3),
             "body": f"<p>I am not sure, but I doubt that {claim} ({SYNTHETIC}).</p>"},
            {"answer_id": 500000 + 3 * i + 1, "score": rng.randint(5, 40),
             "body": f"<p>In general, no. Courts in <strong>{place.replace('-', ' ')}</strong> have held that {rule}."
                     f"</p><ul><li>Check the statute for your jurisdiction.</li><li>Keep written records &amp; "
                     f"dates.</li></ul><p>This is a {SYNTHETIC} answer.</p>"},
        ]
        if i % 10 == 3:  # unanswered questions are common on the site: the converter drops and counts them
            answers = []
        elif i % 10 == 7:  # an answer whose HTML holds no text is no answer either
            answers = [{"answer_id": 500000 + 3 * i, "score": 2, "body": "<p> </p>"}]
        rng.shuffle(answers)
        rows.append({
            "question_id": 90000 + i,
            "question_title": f"Is it true that {claim}?",
            "question_body": f"<p>{asker.capitalize()} told me that {claim}. I live in {place.replace('-', ' ')}.</p>"
                             f"<blockquote>Is this <em>really</em> the law?</blockquote>"
                             f"<p>See <a href=\"https://example.org/{i}\">this post</a> ({SYNTHETIC}).</p>",
            "answers": answers,
            "score": rng.randint(-1, 25),
            "tags": [area, place],
            "link": f"https://law.stackexchange.example/questions/{90000 + i}",
            "license": "CC BY-SA 4.0",
        })
    return rows + rows[:4]  # the same questions scraped twice: the shared deduplication counts them


# Finance: made-up companies and tickers
COMPANIES = [("Nordvik Paper", "NVPX"), ("Acme Robotics", "ACRB"), ("Harbor Freight Lines", "HBFL"),
             ("Solano Energy", "SLNE"), ("Quill Holdings", "QUIL"), ("Brightwater Foods", "BWFD"),
             ("Kestrel Semiconductors", "KSTL"), ("Meridian Insurance", "MRDN"), ("Tallis Pharma", "TLPH"),
             ("Orchard Retail", "ORCH")]
METRICS = ["net sales", "operating profit", "order intake", "net profit", "gross margin"]
# percentage change -> the graded label FinGPT's NWGI subset would give it, and the plain label of its other subsets
MOVES = [(-35, "strong negative", "negative"), (-12, "moderately negative", "negative"),
         (-2, "mildly negative", "negative"), (0, "neutral", "neutral"), (3, "mildly positive", "positive"),
         (14, "moderately positive", "positive"), (40, "strong positive", "positive")]
FINGPT_PLAIN = "What is the sentiment of this news? Please choose an answer from {negative/neutral/positive}."
FINGPT_GRADED = ("What is the sentiment of this news? Please choose an answer from {strong negative/moderately "
                 "negative/mildly negative/neutral/mildly positive/moderately positive/strong positive}.")


def _headline(company: str, metric: str, change: int, quarter: int) -> str:
    if change == 0:
        return f"{company} said its {metric} for Q{quarter} was unchanged from a year earlier ({SYNTHETIC})."
    direction = "rose" if change > 0 else "fell"
    return f"{company} said its {metric} {direction} {abs(change)}% in Q{quarter} ({SYNTHETIC})."


def fingpt_unique_rows(n: int = 48) -> list[dict]:
    rows = []
    for i in range(n):
        company, _ = COMPANIES[i % len(COMPANIES)]
        change, graded, plain = MOVES[i % len(MOVES)]
        graded_row = i % 3 == 0
        rows.append({
            "input": _headline(company, METRICS[i % len(METRICS)], change, 1 + i % 4),
            "output": graded if graded_row else plain,
            "instruction": FINGPT_GRADED if graded_row else FINGPT_PLAIN,
        })
    return rows


def fingpt_sentiment_rows(rng: random.Random) -> list[dict]:
    rows = []
    for row in fingpt_unique_rows():
        rows.extend([row] * rng.choice([1, 2, 3, 4]))  # the real set repeats its sources several times over
    rng.shuffle(rows)
    return rows


def financial_qa_rows(rng: random.Random, per_ticker: int = 8) -> list[dict]:
    rows = []
    for company, ticker in COMPANIES:
        revenue, growth, rnd = rng.randint(200, 9000), rng.randint(-10, 30), rng.randint(5, 400)
        context = (f"{SYNTHETIC} 10-K excerpt. In fiscal 2023, {company} recorded revenue of ${revenue} million, "
                   f"a change of {growth}% from fiscal 2022. Research and development expense was ${rnd} million. "
                   f"The company had {rng.randint(300, 20000)} employees at year end.")
        qa = [
            (f"What was {company}'s revenue in fiscal 2023?", f"${revenue} million."),
            (f"By how much did {company}'s revenue change in fiscal 2023?", f"It changed by {growth}% from 2022."),
            (f"How much did {company} spend on research and development in fiscal 2023?", f"${rnd} million."),
            (f"What does the filing say about {company}'s workforce?",
             "It reports the number of employees at year end."),
        ]
        for j in range(per_ticker):
            question, answer = qa[j % len(qa)]
            if j >= len(qa):
                question = f"According to the filing, {question[0].lower()}{question[1:]}"
            rows.append({
                "question": question,
                "answer": "" if (ticker, j) == ("QUIL", 5) else answer,  # one unanswered row, dropped and counted
                "context": context,
                "ticker": ticker,
                "filing": "2023_10K",
            })
    return rows


def phrasebank_lines(rng: random.Random, n: int = 40) -> list[str]:
    """`sentence@label` lines as in FinancialPhraseBank-v1.0, with the accented names and currency signs that make
    its latin-1 encoding matter; a few sentences also appear in the FinGPT sample (duplicates across sources)."""
    names = ["Päivä Oyj", "Société Générale du Nord", "Kärkkäinen Metals", "Åland Shipping"]
    shared = [(row["input"], row["output"]) for row in fingpt_unique_rows() if row["instruction"] == FINGPT_PLAIN]
    lines = [f"{sentence}@{label}" for sentence, label in shared[:3]]
    for i in range(n - len(lines)):
        change, _, plain = MOVES[i % len(MOVES)]
        company = names[i % len(names)]
        if i % 9 == 4:  # an '@' inside the sentence: the label is what follows the last one
            sentence = f"{company} answers investors at ir@{company.split()[0].lower()}.example ({SYNTHETIC}) ."
            plain = "neutral"
        else:
            sentence = (f"{company} operating profit {'rose' if change >= 0 else 'fell'} to £ "
                        f"{rng.randint(2, 90)}.{rng.randint(0, 9)} mn ( {SYNTHETIC} ) .")
        lines.append(f"{sentence}@{plain}")
    return lines


def main() -> None:
    rng = random.Random(1234)
    _write(SAMPLES_DIR / "medical" / "medqa.jsonl", medqa_rows(rng))
    _write(SAMPLES_DIR / "medical" / "medmcqa.jsonl", medmcqa_rows(rng))
    _write(SAMPLES_DIR / "medical" / "pubmedqa.jsonl", pubmedqa_rows(rng))
    _write(SAMPLES_DIR / "medical" / "flashcards.jsonl", flashcard_rows(rng))
    rng = random.Random(5678)
    _write(SAMPLES_DIR / "legal" / "case_hold.jsonl", case_hold_rows(rng))
    _write(SAMPLES_DIR / "legal" / "law_stackexchange.jsonl", law_stackexchange_rows(rng))
    rng = random.Random(9012)
    _write(SAMPLES_DIR / "finance" / "fingpt_sentiment.jsonl", fingpt_sentiment_rows(rng))
    _write(SAMPLES_DIR / "finance" / "financial_qa_10k.jsonl", financial_qa_rows(rng))
    # the raw PhraseBank files are latin-1 text, one `sentence@label` per line, CRLF line ends
    (SAMPLES_DIR / "finance" / "Sentences_AllAgree.txt").write_bytes(
        "".join(line + "\r\n" for line in phrasebank_lines(rng)).encode("latin-1"))


if __name__ == "__main__":
    main()
