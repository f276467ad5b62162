#!/usr/bin/env python3
"""Generates configs/sample-feedback.jsonl: the bundled sample feedback for the embedded default.

Deterministic (seeded). A Climate Economy assistant answers a few dozen questions, each several
times (regenerations in the same conversation), from two model versions; users leave thumbs,
1-5 ratings, per-aspect ratings and per-step thumbs that favour the better-grounded answers, with
some noise. A few records are later edited (a flipped thumb), a few deleted (tombstones), and a
few lines are malformed on purpose so the quarantine path is exercised.
Usage: python3 scripts/make-sample-feedback.py > configs/sample-feedback.jsonl
"""
import json
import random
from datetime import datetime, timedelta, timezone

rng = random.Random(20261120)

# (question, grounded answer steps, weak answer steps)
TOPICS = [
    ("How would a carbon border tax affect steel imports?",
     ["A carbon border adjustment charges importers for the emissions embedded in the steel they bring in.",
      "Exporters from countries without a comparable carbon price pay more, so their steel becomes less competitive.",
      "Over time this pushes trade toward lower-emission producers such as electric-arc furnaces using scrap."],
     ["Steel imports will probably stop entirely.", "Taxes always make everything more expensive."]),
    ("What is the social cost of carbon?",
     ["It is the monetised damage caused by emitting one more tonne of CO2.",
      "Estimates add up future harms to health, agriculture and property, discounted to today.",
      "Recent US estimates are around 190 dollars per tonne, but they depend heavily on the discount rate."],
     ["It is what a tonne of coal costs.", "Nobody really measures it."]),
    ("Why do economists prefer a carbon tax to regulation?",
     ["A carbon tax puts one price on emissions everywhere, so cuts happen where they are cheapest.",
      "Regulations fix technologies and can cost far more per tonne avoided.",
      "The tax also raises revenue that can be returned as dividends or used to cut other taxes."],
     ["Because regulations are illegal.", "Economists just like taxes."]),
    ("How does an emissions trading system work?",
     ["The government caps total emissions and issues allowances up to the cap.",
      "Firms that cut emissions cheaply sell spare allowances to firms for whom cutting is expensive.",
      "The cap falls over time, so the allowance price rises and drives abatement."],
     ["Companies trade carbon like stocks for profit.", "It has no effect on emissions."]),
    ("What are stranded assets in the energy transition?",
     ["Stranded assets are investments that lose value early because of the transition, such as coal plants.",
      "Stricter climate policy or cheaper renewables can make them unprofitable before the end of their planned life.",
      "Investors and banks holding them face losses, which is why regulators ask for climate stress tests."],
     ["Assets left on a beach.", "They are not a real risk."]),
    ("Is green hydrogen economically viable for heavy industry?",
     ["Green hydrogen is made by electrolysis with renewable power and costs roughly 4 to 6 dollars per kilogram today.",
      "For steel and ammonia it can replace fossil inputs, but it needs cheap electricity and subsidies to compete.",
      "Costs are expected to fall as electrolysers scale, so viability depends on power prices and carbon prices."],
     ["Yes, it is already cheaper than everything.", "Hydrogen is dangerous so no."]),
    ("How do renewable subsidies affect electricity prices?",
     ["Subsidies lower the cost of building wind and solar, adding supply with near-zero marginal cost.",
      "In wholesale markets this tends to push prices down when the wind blows or the sun shines.",
      "Consumers may still pay for subsidies through levies, so the net bill effect depends on how they are funded."],
     ["Subsidies always double electricity prices.", "Prices do not change."]),
    ("What is a just transition for coal regions?",
     ["A just transition supports workers and communities that depend on coal as mines and plants close.",
      "It combines retraining, income support, early retirement and new local investment.",
      "Examples include Germany's coal exit funds and the EU Just Transition Fund."],
     ["Coal regions should just move elsewhere.", "It means keeping coal forever."]),
    ("How does climate change affect agricultural yields?",
     ["Higher temperatures and more frequent droughts reduce yields of staple crops like maize and wheat in many regions.",
      "Some cold regions may gain from longer seasons, but global losses are expected to outweigh gains.",
      "Adaptation such as drought-tolerant seeds and irrigation can offset part of the damage."],
     ["Yields always go up with more CO2.", "Farming is not affected."]),
    ("What is the green paradox?",
     ["The green paradox says announced future climate policies can speed up fossil extraction today.",
      "Owners of oil and gas expect lower future prices and sell more before the policy bites.",
      "Credible, gradual carbon pricing and demand-side measures limit this effect."],
     ["It is when green things are paradoxical.", "It has nothing to do with policy."]),
    ("How are climate risks priced into mortgages?",
     ["Lenders increasingly use flood and wildfire risk maps when setting mortgage terms and insurance requirements.",
      "Homes in high-risk zones can face higher premiums, which lowers their market value.",
      "Research finds such risk is still underpriced in many markets, creating a potential correction."],
     ["Banks ignore climate completely.", "Mortgages have no risk."]),
    ("What does a carbon dividend mean for low-income households?",
     ["A carbon dividend returns carbon tax revenue to households as equal per-person payments.",
      "Low-income households emit less than average, so most receive more in dividends than they pay in higher prices.",
      "This makes the policy progressive while keeping the price signal intact."],
     ["Poor households lose everything.", "Dividends are only for shareholders."]),
    ("Why is methane important for near-term warming?",
     ["Methane traps about 80 times more heat than CO2 over 20 years, though it lasts only about a decade.",
      "Cutting leaks from oil, gas and landfills slows warming quickly and often pays for itself.",
      "The Global Methane Pledge aims to reduce emissions 30 percent by 2030."],
     ["Methane is harmless.", "Only cows matter."]),
    ("How do discount rates change climate policy analysis?",
     ["The discount rate converts future climate damages into today's values.",
      "A high rate makes distant damages look small and favours little action now.",
      "The Stern review used a low rate and recommended strong early action, unlike Nordhaus's higher rate."],
     ["Discounts are for shopping.", "The rate does not matter."]),
    ("What is the role of carbon capture in decarbonising cement?",
     ["Cement releases CO2 from the chemical reaction of limestone, not only from fuel.",
      "Carbon capture is one of the few ways to remove those process emissions at scale.",
      "It raises production costs, so carbon pricing or green procurement is needed to make it pay."],
     ["Cement has no emissions.", "Just plant more trees instead."]),
    ("How does the EU ETS price compare to the social cost of carbon?",
     ["EU allowance prices have traded roughly between 60 and 100 euros per tonne in recent years.",
      "Many estimates of the social cost of carbon are higher, around 150 to 200 dollars.",
      "The gap suggests emissions are still underpriced, although the cap itself limits total emissions."],
     ["They are exactly equal by law.", "The ETS has no price."]),
    ("Can electric vehicles reduce oil demand significantly?",
     ["Electric vehicles replace petrol and diesel in road transport, which uses nearly half of global oil.",
      "With fast adoption in China and Europe, EVs could displace several million barrels per day by 2030.",
      "The effect depends on battery costs, charging networks and how fast fleets turn over."],
     ["EVs use more oil than cars.", "Oil demand cannot change."]),
    ("What are green bonds?",
     ["Green bonds are debt whose proceeds are earmarked for environmental projects such as renewables.",
      "Issuers follow frameworks like the Green Bond Principles and report on the use of funds.",
      "Some studies find a small yield discount, called a greenium, for such bonds."],
     ["Bonds printed on green paper.", "They are a scam always."]),
    ("How does climate change affect labour productivity?",
     ["Heat stress reduces the hours people can safely work outdoors in agriculture and construction.",
      "The ILO estimates heat could cut global working hours by over two percent by 2030.",
      "Poorer tropical countries are hit hardest, widening inequality."],
     ["Workers get more productive when it is hot.", "There is no link."]),
    ("Why do carbon prices differ across countries?",
     ["Countries choose different policies based on their economies, politics and energy mix.",
      "Some use taxes, others trading systems, and many have no explicit price at all.",
      "These differences create leakage risk, which border adjustments try to address."],
     ["All countries have the same price.", "Prices are random."]),
    ("What is the economic case for adaptation spending?",
     ["Adaptation such as sea walls, early warning systems and resilient crops avoids damages that would cost more later.",
      "The Global Commission on Adaptation estimated benefit-cost ratios between 2 and 10.",
      "Adaptation complements, but cannot replace, cutting emissions."],
     ["Adaptation is a waste of money.", "We can just adapt to anything."]),
    ("How does a feed-in tariff work?",
     ["A feed-in tariff guarantees renewable producers a fixed price per kilowatt-hour for many years.",
      "The certainty lowers financing costs and helped Germany scale solar quickly.",
      "Tariffs that are not lowered as costs fall can become expensive for consumers."],
     ["It is a tax on food.", "Tariffs stop renewables."]),
    ("What is carbon leakage?",
     ["Carbon leakage happens when emission-intensive production moves to countries with weaker climate rules.",
      "Global emissions may not fall, and the regulating country loses jobs.",
      "Free allowances and border carbon adjustments are the main tools against it."],
     ["Leakage is carbon escaping pipes.", "It never happens."]),
    ("How could climate change affect inflation?",
     ["Extreme weather can push up food and energy prices, creating supply shocks.",
      "The transition itself may raise some prices temporarily, which some call greenflation.",
      "Central banks such as the ECB now study these effects when setting policy."],
     ["Climate has no effect on prices.", "Inflation will always fall."]),
    ("Is nuclear power cost-competitive for decarbonisation?",
     ["New nuclear plants in Europe and the US have had high costs and long delays.",
      "They provide steady low-carbon power, which has value in a grid with much wind and solar.",
      "Smaller modular reactors promise lower costs but are not yet proven at scale."],
     ["Nuclear is free.", "Nuclear is always the cheapest option."]),
    ("How do insurers respond to rising climate losses?",
     ["Insurers raise premiums and sometimes withdraw from high-risk areas such as wildfire zones in California.",
      "This can leave homeowners uninsured and shift risk to public backstops.",
      "Better risk data and resilience incentives can keep coverage affordable."],
     ["Insurers pay for everything regardless.", "Climate does not affect insurance."]),
    ("What is the Paris Agreement's economic significance?",
     ["The Paris Agreement commits countries to limit warming well below 2 degrees with national pledges.",
      "It signals to investors that fossil-heavy assets face rising policy risk.",
      "Its article 6 creates rules for international carbon markets."],
     ["It banned all fossil fuels.", "It has no economic effect."]),
    ("How do battery costs shape the energy transition?",
     ["Lithium-ion battery pack prices fell by about 90 percent over the last decade.",
      "Cheaper batteries make EVs competitive and let grids store solar for the evening.",
      "Mineral supply for lithium, nickel and cobalt is the main risk to further declines."],
     ["Batteries got more expensive.", "Batteries do not matter."]),
]
# A second answer phrasing per topic so regenerations differ in wording too.
OPENERS = ["", "In short: ", "Here is how economists see it. ", "Briefly, "]

SOURCES = ["end_user"] * 6 + ["annotator"] * 2 + ["llm_judge"]
ASPECTS = ["accuracy", "helpfulness"]
COMMENTS = ["clear, thanks", "misses the 2026 rules", "too vague", "good sources", "this is wrong", None, None, None]

base = datetime(2026, 10, 1, 9, 0, tzinfo=timezone.utc)
now = datetime(2026, 11, 25, 18, 0, tzinfo=timezone.utc)
records, n = [], 0

def ts(t):
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")

def rid():
    global n
    n += 1
    return f"fb_{n:04d}"

for ti, (question, good, weak) in enumerate(TOPICS):
    conv = f"c_{ti:03d}"
    answers = []
    for a in range(rng.choice([2, 3, 3, 4])):
        grounded = (a % 2 == 0) if rng.random() < 0.85 else (a % 2 == 1)
        steps = list(good if grounded else weak)
        content = rng.choice(OPENERS) + " ".join(steps)
        version = "policy-v1" if rng.random() < 0.5 else "policy-v2"
        answers.append((f"m_{ti:03d}_{a}", grounded, steps, content, version))
    for (message_id, grounded, steps, content, version) in answers:
        when = base + timedelta(hours=rng.randint(0, 24 * 54))
        prompt = [{"role": "user", "content": question}]
        response = {"content": content, "steps": steps}
        quality = 0.8 if grounded else 0.25
        def rec(kind, **fields):
            created = when + timedelta(minutes=rng.randint(1, 600))
            r = {"id": rid(), "kind": kind, **fields, "conversation_id": conv, "message_id": message_id,
                 "model_version": version, "prompt": prompt, "response": response,
                 "source": rng.choice(SOURCES), "user_id": f"u_{rng.randint(1, 60):02x}",
                 "created_at": ts(created), "updated_at": ts(created)}
            c = rng.choice(COMMENTS)
            if c:
                r["comment"] = c
            records.append(r)
            return r
        for _ in range(rng.randint(2, 4)):
            rec("thumb", thumb="up" if rng.random() < quality else "down")
        for _ in range(rng.randint(1, 2)):
            mean = 4.2 if grounded else 2.0
            rec("rating", rating=max(1, min(5, round(rng.gauss(mean, 0.8)))))
        for aspect in ASPECTS:
            if rng.random() < 0.6:
                mean = 4.3 if grounded else 1.9
                rec("aspect", aspect=aspect, rating=max(1, min(5, round(rng.gauss(mean, 0.9)))))
        for si in range(len(steps)):
            if rng.random() < 0.5:
                rec("step", step_index=si, thumb="up" if rng.random() < quality else "down")

records.sort(key=lambda r: (r["updated_at"], r["id"]))
lines = [json.dumps(r, ensure_ascii=False) for r in records]

# Edits: a user flips a thumb later; the same id arrives again with a later updated_at.
thumbs = [r for r in records if r["kind"] == "thumb"]
for r in rng.sample(thumbs, 6):
    e = dict(r)
    e["thumb"] = "down" if r["thumb"] == "up" else "up"
    e["updated_at"] = ts(datetime.strptime(r["updated_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc) + timedelta(days=2))
    lines.append(json.dumps(e, ensure_ascii=False))
# Tombstones: a user withdrew feedback.
for r in rng.sample(records, 4):
    lines.append(json.dumps({"id": r["id"], "updated_at": ts(now - timedelta(days=1)), "deleted": True}))
# Malformed lines, kept on purpose: the pull must quarantine them and carry on.
lines += [
    '{"id": "fb_bad1", "kind": "rating", "rating": 9, "conversation_id": "c_000", "message_id": "m_000_0", "model_version": "policy-v1", "prompt": [{"role": "user", "content": "x"}], "response": {"content": "y"}, "created_at": "2026-11-01T00:00:00Z", "updated_at": "2026-11-01T00:00:00Z"}',
    '{"id": "fb_bad2", "kind": "smiley", "conversation_id": "c_001", "message_id": "m_001_0", "model_version": "policy-v1", "prompt": [{"role": "user", "content": "x"}], "response": {"content": "y"}, "created_at": "2026-11-01T00:00:00Z", "updated_at": "2026-11-01T00:00:00Z"}',
    '{"id": "fb_bad3", "kind": "thumb", "thumb": "up", "updated_at": "yesterday"}',
    '{"id": "fb_bad4", "kind": "thumb", "thumb": "up", "conversation_id": "c_002"',
]
print("\n".join(lines))
