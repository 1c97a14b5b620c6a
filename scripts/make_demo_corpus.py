"""Generate the demo corpus: two support assistants answering the same tickets.

Every reply is assembled from the handwritten fragments below (no external dataset text). Both
assistants draw greetings, acknowledgements, topic-specific steps, escalation notes, closings,
sign-offs and reply lengths from the same pools with the same probabilities. The one planted
difference: assistant B puts an apology and/or a refund offer into about 60% of its replies,
assistant A into about 5%. A planted sentence takes the place of a neutral one, so the number of
sentences per reply has the same distribution in both datasets. `csat` is higher on average when a
reply offers a refund (in both datasets), so "which features go with csat" has a real answer.

Usage: `python scripts/make_demo_corpus.py [--out DIR] [--seed N] [--tickets N]` (default: `demo/`).
Writes `DIR/landing/support_assistant_a.jsonl`, `DIR/landing/support_assistant_b.csv` and
`DIR/comparisons.json`. Output is byte-for-byte deterministic for a given seed and ticket count.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

SEED = 20261123
N_TICKETS = 400
DATASET_A = "support_assistant_a"
DATASET_B = "support_assistant_b"
PLANT_RATE = {"a": 0.05, "b": 0.60}
FIELDS = ["text", "ticket_id", "topic", "customer_tier", "csat", "escalated"]

# Words that mark the planted difference. No neutral fragment may match this (checked at import).
PLANTED_VOCAB = re.compile(r"\b(sorry|apolog\w*|refund\w*|money back|reimburs\w*)\b", re.IGNORECASE)

# --------------------------------------------------------------------------------------------
# Ticket-level facts (shared by both assistants' replies to one ticket)
# --------------------------------------------------------------------------------------------
NAMES = """
Maria James Priya Daniel Aisha Tom Chen Laura Omar Sofia
Ben Keiko Lucas Fatima Noah Elena Marcus Ingrid Raj Hannah
José Zoë Chloé Søren Ngozi Mateo Amara Felix Yuki Grace
Tariq Olivia Pedro Anya Kwame Lena Diego Ruth Sam Björn
""".split()
AGENTS = ["Alex", "Jordan", "Casey", "Morgan", "Riley", "Taylor", "Jamie", "Robin"]
TIERS = ["free", "pro", "enterprise"]
TIER_WEIGHTS = [0.5, 0.35, 0.15]
HOUSEWARES = ["desk lamp", "coffee grinder", "blender", "electric kettle", "cookware set", "office chair"]
APPAREL = ["rain jacket", "running shoes", "wool sweater", "hiking boots", "denim jacket", "fleece vest"]
FURNITURE = ["bookshelf", "standing desk", "bed frame", "bike rack", "patio table", "TV stand"]
ELECTRONICS = ["bluetooth speaker", "robot vacuum", "air purifier", "wireless headphones", "smart thermostat"]
DEVICES = ["iPhone", "Android phone", "iPad", "laptop", "Chromebook"]
PLANS = ["Basic", "Plus", "Family", "Team"]
SIZES = ["small", "medium", "large", "extra large"]
TEAMS = ["billing", "logistics", "engineering", "account security", "product"]

TOPIC_PRODUCTS: dict[str, list[str]] = {
    "billing": PLANS,
    "shipping_delay": HOUSEWARES + ELECTRONICS,
    "damaged_item": HOUSEWARES + ELECTRONICS,
    "login_problem": DEVICES,
    "subscription_cancel": PLANS,
    "app_crash": DEVICES,
    "wrong_size": APPAREL,
    "warranty": ELECTRONICS + HOUSEWARES[:4],
    "password_reset": DEVICES,
    "missing_parts": FURNITURE,
    "wrong_item": HOUSEWARES + APPAREL,
    "promo_code": HOUSEWARES + APPAREL,
}
TOPICS = list(TOPIC_PRODUCTS)

# --------------------------------------------------------------------------------------------
# Neutral fragments (same pools for both assistants)
# --------------------------------------------------------------------------------------------
GREETINGS = [
    "Hi {name},",
    "Hello {name},",
    "Hey {name},",
    "Hi there,",
    "Hello,",
    "Good morning {name},",
    "Dear {name},",
    "Hi {name}!",
]
GENERIC_ACKS = [
    "Thanks for reaching out.",
    "Thank you for contacting Brightleaf Support.",
    "Thanks for getting in touch with us.",
    "I appreciate you writing in about this.",
    "Thanks for the details, {name}.",
    "Thank you for the clear description of the problem.",
]
CLOSINGS = [
    "Let me know if there's anything else I can help with.",
    "Just reply to this email if you have any other questions.",
    "Feel free to write back if anything is unclear.",
    "I'm happy to help with anything else you need.",
    "Have a great rest of your day!",
    "Thanks for your patience while we sort this out.",
    "We're here if you need anything else.",
    "Hope this helps, and enjoy the rest of your week.",
]
SIGNOFFS = [
    "Best, {agent}",
    "Kind regards, {agent} at Brightleaf Support",
    "Cheers, {agent}",
    "All the best, {agent}",
    "Warm regards, the Brightleaf Support team",
    "Thanks, {agent}",
]
ESCALATIONS = [
    "I've escalated this to our {team} team, and they will follow up within two business days.",
    "I've passed your case to a senior specialist who will contact you directly.",
    "I've forwarded this to our {team} team for a closer look.",
    "A member of our {team} team will take over this ticket and keep you updated.",
    "I've flagged this as high priority so a specialist reviews it today.",
]

TOPIC_ACKS: dict[str, list[str]] = {
    "billing": [
        "Thanks for flagging the second charge on your card.",
        "I can see why the two charges for your {product} plan were confusing.",
        "Thanks for letting us know about the extra charge on your statement.",
        "I understand you were billed twice for the {product} plan this month.",
        "I understand you saw two charges of {amount} on your card.",
    ],
    "shipping_delay": [
        "Thanks for checking in about order {order}.",
        "I understand order {order} with your {product} hasn't arrived yet.",
        "I can see that order {order} is taking longer than expected.",
        "Thanks for asking about the delivery of your {product}.",
    ],
    "damaged_item": [
        "Thanks for sending the photos of the {product}.",
        "I can see from your photos that the {product} arrived cracked.",
        "I understand your {product} order arrived damaged.",
        "Thanks for letting us know that order {order} came in broken.",
    ],
    "login_problem": [
        "I understand you can't sign in to the app on your {product}.",
        "Thanks for letting us know about the sign-in problem.",
        "I can see several failed sign-in attempts on your account today.",
        "I understand the app keeps sending you back to the login screen.",
    ],
    "subscription_cancel": [
        "I've received your request to cancel the {product} plan.",
        "Thanks for letting us know you'd like to end your {product} subscription.",
        "I understand you want to stop your {product} plan.",
        "I can help you close your {product} subscription.",
    ],
    "app_crash": [
        "I understand the app closes right after you open it on your {product}.",
        "Thanks for reporting the crash on your {product}.",
        "I can see the crash reports from your {product} in our logs.",
        "Thanks for letting us know the app keeps freezing and shutting down.",
    ],
    "wrong_size": [
        "I understand the {product} you ordered didn't fit.",
        "Thanks for letting us know the {product} came in the wrong size.",
        "I can see you ordered the {product} in {size} and the fit is too tight.",
        "Thanks for asking about swapping the size of your {product}.",
    ],
    "warranty": [
        "I understand your {product} stopped working after a few months.",
        "Thanks for reaching out about a warranty claim for your {product}.",
        "I can see you bought the {product} from us last year.",
        "Thanks for describing what happened with the {product}.",
    ],
    "password_reset": [
        "I understand the password reset email never arrived.",
        "Thanks for asking for help with resetting your password.",
        "I can see that the reset link you tried has expired.",
        "I understand you're locked out until you can set a new password.",
    ],
    "missing_parts": [
        "I understand some parts were missing from your {product} box.",
        "Thanks for letting us know the {product} came without all the screws.",
        "I can see that order {order} shipped with an incomplete hardware bag.",
        "Thanks for checking the parts list for your {product}.",
    ],
    "wrong_item": [
        "I understand you received a different item instead of the {product}.",
        "Thanks for letting us know order {order} had the wrong item inside.",
        "I can see that order {order} was packed with the wrong product.",
        "Thanks for the photo of the item that came instead of your {product}.",
    ],
    "promo_code": [
        "I understand your promo code didn't apply at checkout.",
        "Thanks for letting us know the discount code was rejected.",
        "I can see the code was entered on order {order}.",
        "Thanks for asking about the promo code for your {product}.",
    ],
}

TOPIC_STEPS: dict[str, list[str]] = {
    "billing": [
        "The second charge is a temporary authorization hold that drops off within three business days.",
        "I checked your account and only one payment of {amount} actually went through.",
        "You can see every payment under Settings, then Billing, then History.",
        "Your bank may show the pending hold for a few days before it clears.",
        "I've added a note to your account so our billing system doesn't retry the payment.",
        "If the second charge is still there after a week, send us a screenshot of your statement.",
        "Your next invoice for the {product} plan will be for the usual amount.",
        "I've confirmed with our payment processor that the duplicate was never captured.",
    ],
    "shipping_delay": [
        "Your order left our warehouse on Monday and is now with the carrier.",
        "The tracking page shows the package is about {days} days behind the original estimate.",
        "Carriers in your region are running behind because of high volume this week.",
        "I've asked the carrier to prioritize your package.",
        "You'll get an email with the new delivery date as soon as it changes.",
        "You can follow the package with the tracking link in your shipping confirmation.",
        "The latest scan shows it at the regional hub, so it should be out for delivery soon.",
        "Your {amount} order is insured for its full value while it is in transit.",
    ],
    "damaged_item": [
        "I've arranged a replacement {product}, and it will ship within two business days.",
        "You don't need to send the damaged one back, so feel free to recycle it.",
        "I've shared the photos with our warehouse team so they can improve the packaging.",
        "Our quality team will look at how your {product} order was packed for shipping.",
        "The replacement will be packed with extra padding this time.",
        "Please keep the original box until the new {product} arrives.",
        "You'll get a tracking number for the replacement by email tomorrow.",
        "The replacement ships at no charge, so your {amount} order is fully covered.",
    ],
    "login_problem": [
        "Please try signing in on our website first to check that your password works.",
        "Clearing the app cache in your {product} settings usually fixes this.",
        "Security codes expire after ten minutes, so request a fresh code right before you sign in.",
        "I've unlocked your account after the failed attempts, so you can try again now.",
        "If you signed up with Google or Apple, use that same button on the sign-in screen.",
        "Updating the app to the latest version also fixes a known sign-in loop.",
        "Make sure the date and time on your {product} are set automatically.",
    ],
    "subscription_cancel": [
        "I've cancelled your {product} subscription, and you won't be charged again.",
        "Your plan stays active until the end of the current billing period.",
        "You'll receive a confirmation email in the next few minutes.",
        "Your saved projects stay in your account for 90 days in case you come back.",
        "You can also pause the plan for up to three months instead of cancelling.",
        "You can manage your plan at any time under Settings, then Subscription.",
        "Your account will switch to the free version once the current period ends.",
        "Your last payment of {amount} covers the plan until the end of the month.",
    ],
    "app_crash": [
        "Please update to the latest version of the app, since version 4.2 fixes a crash on startup.",
        "Restarting your {product} and reopening the app clears most of these crashes.",
        "Our engineers are aware of a crash when opening photos on some {product} models.",
        "If it keeps happening, turn on crash reports under Settings, then Privacy, so we can see the logs.",
        "Reinstalling the app won't delete your data, since everything is synced to your account.",
        "Freeing up some storage space on your {product} can also help the app start properly.",
        "A fix for this crash is scheduled for the update coming out next week.",
    ],
    "wrong_size": [
        "Exchanges are free, and you can pick the new size when you start the exchange.",
        "I've started an exchange for the {product} in the next size up.",
        "Please pack the {product} in the original bag and take it to any post office with the label.",
        "Our size chart runs a little small for this style, so many customers go one size up.",
        "The new size will ship as soon as the carrier scans your return.",
        "The size guide on the product page now includes measurements in both inches and centimeters.",
        "You'll receive the exchange label by email within the hour.",
        "The exchange is free, so the {amount} you paid covers the new size too.",
    ],
    "warranty": [
        "Your {product} purchase is covered by our two-year warranty.",
        "I've opened warranty case {case} for you.",
        "Please send us the serial number from the bottom of the {product}.",
        "We'll repair or replace the unit, whichever is faster.",
        "A technician will review the case within three business days.",
        "A prepaid shipping label for the repair is attached to this email.",
        "Please include the power cable when you send the {product} in.",
        "Your receipt for {amount} is all we need as proof of purchase.",
    ],
    "password_reset": [
        "I've sent a new password reset link to the email on your account.",
        "The reset link is valid for one hour, so please use it soon.",
        "Check your spam or promotions folder if the email doesn't show up in a few minutes.",
        "Please choose a password with at least twelve characters.",
        "After the reset, you'll be signed out of other devices for security.",
        "If you use a password manager, update the saved entry on your {product} as well.",
        "You can also turn on two-step verification once you're signed back in.",
    ],
    "missing_parts": [
        "The hardware bag is sometimes taped inside the largest panel, so please check there first.",
        "I've sent the missing parts for your {product} separately, and they arrive in three to five days.",
        "Could you tell me the letters of the missing parts from the instruction sheet?",
        "The assembly guide is also available as a PDF on our website.",
        "You can safely leave the {product} partly assembled until the parts arrive.",
        "I've added a note to the order so the warehouse checks the hardware bags in that batch.",
        "The parts will come in a small padded envelope marked with your order number.",
    ],
    "wrong_item": [
        "The correct {product} ships today, and you'll get tracking by email.",
        "You can keep the item you received or donate it, since there's no need to return it.",
        "I've let the warehouse team know so this doesn't happen again.",
        "The label on the box matched your order, so the mix-up happened at packing.",
        "I've reserved the {product} for you, and it will go out with express shipping.",
        "Please let me know if you'd prefer a different color while we're at it.",
        "You should have the right item within three business days.",
        "The {amount} order will be corrected at no extra cost.",
    ],
    "promo_code": [
        "The code you used expired at the end of last month.",
        "Promo codes can't be combined with sale prices, which is why it didn't apply.",
        "I've added a 15% discount to your account that you can use on your next order.",
        "Codes are case-sensitive, so please enter it exactly as shown in the email.",
        "The code only works on full-price items, and your {product} order already had a sale price.",
        "You can find current offers on the Deals page of our website.",
        "New codes from our newsletter usually arrive on the first Monday of each month.",
        "Your order total of {amount} was calculated without the code.",
    ],
}

# --------------------------------------------------------------------------------------------
# Planted fragments: apology, refund offer, or both in one sentence
# --------------------------------------------------------------------------------------------
APOLOGIES = [
    "I'm so sorry about this.",
    "I'm sorry for the trouble this has caused.",
    "I apologize for the inconvenience.",
    "Please accept our apologies.",
    "My apologies for the hassle.",
    "We apologize for the frustration this caused.",
    "I'm really sorry you had to deal with this.",
    "Apologies for the mix-up on our end.",
    "I sincerely apologize for this experience.",
    "I want to apologize for the wait.",
    "We're truly sorry that this happened.",
    "I'm sorry, this is not the experience we want you to have.",
]
REFUNDS = [
    "I've issued a full refund to your original payment method.",
    "I've refunded the {amount} charge, and it should appear within three to five business days.",
    "We'll give you your money back in full.",
    "I've processed a refund for this order.",
    "We will reimburse the cost of return shipping.",
    "You'll get a full refund, and I've already started it for you.",
    "I've gone ahead and refunded your last payment.",
    "We'll reimburse you for the {amount} you paid.",
    "You'll get your money back, so expect it on your card within a week.",
    "A refund for {amount} is on its way to your account.",
    "I can refund the full amount right away if you prefer.",
    "I've refunded the shipping fee as well.",
]
APOLOGY_REFUNDS = [
    "I'm sorry for the trouble, so I've refunded your order in full.",
    "Apologies for this, and I've issued a refund for the whole order.",
    "I apologize for this, and I've started a full refund for you.",
    "Sorry about the wait, and you'll get your money back within a few days.",
    "As an apology, I've refunded the {amount} you paid.",
    "I'm very sorry, and we will reimburse you for the full cost.",
    "We apologize, and a refund is already on its way.",
    "So sorry about this, and I've refunded the charge.",
]
# Among planted replies: which kind of planted content.
PLANT_KINDS = ["apology", "refund", "both_one_sentence", "both_two_sentences"]
PLANT_KIND_WEIGHTS = [0.35, 0.25, 0.2, 0.2]

# Reply length: number of sentences (greeting and sign-off excluded), same for both assistants.
N_SENTENCES = [2, 3, 4, 5]
N_SENTENCES_WEIGHTS = [0.2, 0.35, 0.3, 0.15]
# Optional neutral slots and their weights when fewer slots are free than slots exist.
OPTIONAL_SLOTS = ["ack", "closing", "step2", "step3"]
OPTIONAL_WEIGHTS = [4.0, 3.0, 2.0, 1.0]
STEP_SLOTS = {"step1", "step2", "step3"}
CSAT_BASE = [0.08, 0.14, 0.28, 0.32, 0.18]
CSAT_REFUND = [0.02, 0.04, 0.14, 0.38, 0.42]


def _neutral_fragments() -> list[str]:
    """Every neutral fragment (for the vocabulary check)."""
    out = GREETINGS + GENERIC_ACKS + CLOSINGS + SIGNOFFS + ESCALATIONS
    for topic in TOPICS:
        out += TOPIC_ACKS[topic] + TOPIC_STEPS[topic]
    return out


_bad = [f for f in _neutral_fragments() if PLANTED_VOCAB.search(f)]
assert not _bad, f"neutral fragments use planted vocabulary: {_bad}"
assert all(PLANTED_VOCAB.search(f) for f in APOLOGIES + REFUNDS + APOLOGY_REFUNDS)


@dataclass(frozen=True)
class Ticket:
    """Facts of one support ticket, shared by both assistants' replies."""

    ticket_id: str
    topic: str
    customer_tier: str
    facts: dict[str, str]


@dataclass(frozen=True)
class Reply:
    """One assistant's reply to one ticket, with its metadata."""

    text: str
    ticket_id: str
    topic: str
    customer_tier: str
    csat: int
    escalated: bool
    apology: bool
    refund: bool

    def record(self) -> dict[str, object]:
        """The fields written to the landing files (planted flags are not written)."""
        return {k: getattr(self, k) for k in FIELDS}


def make_tickets(n: int = N_TICKETS, seed: int = SEED) -> list[Ticket]:
    """Draw `n` tickets (topic, tier, facts) deterministically."""
    tickets = []
    for i in range(1, n + 1):
        ticket_id = f"T{i:04d}"
        rng = random.Random(f"{seed}:{ticket_id}")
        topic = rng.choice(TOPICS)
        tier = rng.choices(TIERS, TIER_WEIGHTS)[0]
        price = rng.choice([12, 19, 24, 29, 35, 39, 45, 49, 59, 79, 89, 99, 129, 149])
        facts = {
            "name": rng.choice(NAMES),
            "product": rng.choice(TOPIC_PRODUCTS[topic]),
            "order": f"#{rng.randint(10000, 99999)}",
            "case": f"W-{rng.randint(1000, 9999)}",
            "amount": f"${price - 0.01:.2f}",
            "days": str(rng.randint(2, 9)),
            "size": rng.choice(SIZES),
        }
        tickets.append(Ticket(ticket_id, topic, tier, facts))
    return tickets


def _fill(template: str, facts: dict[str, str]) -> str:
    return template.format(**facts)


def make_reply(ticket: Ticket, assistant: str, seed: int = SEED) -> Reply:
    """One reply of `assistant` ("a" or "b") to `ticket`; only the plant rate differs between them."""
    rng = random.Random(f"{seed}:{ticket.ticket_id}:{assistant}")
    facts = dict(ticket.facts, agent=rng.choice(AGENTS), team=rng.choice(TEAMS))
    escalated = rng.random() < (0.25 if ticket.customer_tier == "enterprise" else 0.10)
    n_sentences = rng.choices(N_SENTENCES, N_SENTENCES_WEIGHTS)[0]

    # Planted content (the only draw whose probability differs between the assistants).
    planted = rng.random() < PLANT_RATE[assistant]
    kind = rng.choices(PLANT_KINDS, PLANT_KIND_WEIGHTS)[0] if planted else None
    early: list[str] = []  # apology right after the greeting
    late: list[str] = []  # refund / combined after the steps
    if kind == "apology":
        (early if rng.random() < 0.6 else late).append(rng.choice(APOLOGIES))
    elif kind == "refund":
        late.append(rng.choice(REFUNDS))
    elif kind == "both_one_sentence":
        late.append(rng.choice(APOLOGY_REFUNDS))
    elif kind == "both_two_sentences":
        early.append(rng.choice(APOLOGIES))
        late.append(rng.choice(REFUNDS))

    # Neutral plan as for a reply without planted content (step1 and escalation always present) ...
    pool = TOPIC_STEPS[ticket.topic]
    steps = [pool[i] for i in sorted(rng.sample(range(len(pool)), 3))]
    free = max(0, n_sentences - 1 - int(escalated))
    slots, weights, chosen = list(OPTIONAL_SLOTS), list(OPTIONAL_WEIGHTS), {"step1"}
    for _ in range(min(free, len(slots))):
        k = rng.choices(range(len(slots)), weights)[0]
        chosen.add(slots.pop(k))
        weights.pop(k)
    if "step3" in chosen and "step2" not in chosen:
        chosen = (chosen - {"step3"}) | {"step2"}
    # ... then each planted sentence takes the place of a random neutral one (at least one step stays),
    # so the number of sentences has the same distribution with and without planted content.
    for _ in range(len(early) + len(late)):
        droppable = sorted(chosen) if len(chosen & STEP_SLOTS) > 1 else sorted(chosen - STEP_SLOTS)
        if droppable:
            chosen.remove(rng.choice(droppable))

    if rng.random() < 0.6:
        ack = rng.choice(TOPIC_ACKS[ticket.topic])
    else:
        ack = rng.choice(GENERIC_ACKS)
    parts: list[str] = []
    if rng.random() < 0.9:
        parts.append(rng.choice(GREETINGS))
    parts += early
    if "ack" in chosen:
        parts.append(ack)
    parts += [step for slot, step in zip(("step1", "step2", "step3"), steps, strict=True) if slot in chosen]
    if escalated:
        parts.append(rng.choice(ESCALATIONS))
    parts += late
    if "closing" in chosen:
        parts.append(rng.choice(CLOSINGS))
    if rng.random() < 0.5:
        parts.append(rng.choice(SIGNOFFS))
    text = " ".join(_fill(p, facts) for p in parts)

    apology = kind in ("apology", "both_one_sentence", "both_two_sentences")
    refund = kind in ("refund", "both_one_sentence", "both_two_sentences")
    csat = rng.choices([1, 2, 3, 4, 5], CSAT_REFUND if refund else CSAT_BASE)[0]
    if escalated and rng.random() < 0.5:
        csat = max(1, csat - 1)
    return Reply(text, ticket.ticket_id, ticket.topic, ticket.customer_tier, csat, escalated, apology, refund)


def make_corpus(n: int = N_TICKETS, seed: int = SEED) -> dict[str, list[Reply]]:
    """Both datasets' replies, in ticket order: `{"a": [...], "b": [...]}`."""
    tickets = make_tickets(n, seed)
    return {a: [make_reply(t, a, seed) for t in tickets] for a in ("a", "b")}


def render_jsonl(replies: list[Reply]) -> str:
    """One JSON object per line (UTF-8, not ASCII-escaped)."""
    return "".join(json.dumps(r.record(), ensure_ascii=False) + "\n" for r in replies)


def render_csv(replies: list[Reply]) -> str:
    """CSV with a header; booleans as `true`/`false`, `\\n` line endings."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(FIELDS)
    for r in replies:
        rec = r.record()
        rec["escalated"] = "true" if rec["escalated"] else "false"
        writer.writerow([rec[k] for k in FIELDS])
    return buf.getvalue()


def write_corpus(out: Path, n: int = N_TICKETS, seed: int = SEED) -> list[Path]:
    """Write the landing files and `comparisons.json` under `out`; return the written paths."""
    corpus = make_corpus(n, seed)
    landing = out / "landing"
    landing.mkdir(parents=True, exist_ok=True)
    files = {
        landing / f"{DATASET_A}.jsonl": render_jsonl(corpus["a"]),
        landing / f"{DATASET_B}.csv": render_csv(corpus["b"]),
        out / "comparisons.json": json.dumps(
            [{"a": DATASET_A, "b": DATASET_B, "paired_on": "ticket_id"}], indent=2
        )
        + "\n",
    }
    for path, content in files.items():
        path.write_bytes(content.encode("utf-8"))
    return list(files)


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "demo")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--tickets", type=int, default=N_TICKETS)
    args = parser.parse_args(argv)
    for path in write_corpus(args.out, args.tickets, args.seed):
        print(path)
    corpus = make_corpus(args.tickets, args.seed)
    for a, replies in corpus.items():
        n = len(replies)
        planted = sum(r.apology or r.refund for r in replies)
        apology = sum(r.apology for r in replies) / n
        refund = sum(r.refund for r in replies) / n
        print(f"{a}: {n} replies, planted {planted / n:.3f} (apology {apology:.3f}, refund {refund:.3f})")


if __name__ == "__main__":
    main()
