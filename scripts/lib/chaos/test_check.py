"""The checker against hand-made histories: a clean one passes, and each violation kind, put in
alone, is reported as exactly that (run by scripts/test: python3 -m unittest)."""

import copy
import unittest

from check import check, render

R1, R2, R3 = "r-1", "r-2", "r-3"


def clean():
    """Product 1, stock 2: user 10 won (paid), user 11 won (expired: unit back), user 12 won
    (pending payment), user 13 was told sold out while nothing was free."""
    history = [
        {"t": 1.0, "d": 0.01, "op": "reserve", "u": 10, "p": 1, "s": 202, "r": R1},
        {"t": 1.1, "d": 0.01, "op": "reserve", "u": 11, "p": 1, "s": 202, "r": R2},
        {"t": 1.2, "d": 0.01, "op": "reserve", "u": 13, "p": 1, "s": 410, "code": "sold_out"},
        {"t": 2.0, "d": 0.01, "op": "me", "u": 10, "p": 1, "s": 200, "st": "confirmed", "r": R1},
        {"t": 3.0, "d": 0.01, "op": "me", "u": 10, "p": 1, "s": 200, "st": "paid", "r": R1},
        {"t": 20.0, "d": 0.01, "op": "reserve", "u": 12, "p": 1, "s": 202, "r": R3},
        {"t": 60.0, "d": 0.01, "op": "me", "u": 10, "p": 1, "s": 200, "st": "paid", "r": R1, "final": True},
        {"t": 60.0, "d": 0.01, "op": "me", "u": 11, "p": 1, "s": 200, "st": "expired", "r": R2, "final": True},
        {"t": 60.0, "d": 0.01, "op": "me", "u": 12, "p": 1, "s": 200, "st": "confirmed", "r": R3, "final": True},
    ]
    samples = [
        {"t": 0.5, "kind": "remaining", "remaining": {"1": 2}},
        {"t": 1.15, "kind": "remaining", "remaining": {"1": 0}},
        {"t": 1.3, "kind": "remaining", "remaining": {"1": 0}},
        {"t": 1.5, "kind": "live", "live": {"1": 2}},
        {"t": 30.0, "kind": "live", "live": {"1": 2}},
    ]
    final = {
        "products": {"1": {"stock": 2, "remaining": 0, "pending": 0}},
        "orders": [
            {"id": 1, "user": 10, "product": 1, "reservation": R1, "status": "paid"},
            {"id": 2, "user": 11, "product": 1, "reservation": R2, "status": "expired"},
            {"id": 3, "user": 12, "product": 1, "reservation": R3, "status": "pending_payment"},
        ],
        "queue": 0,
        "dlq": 0,
    }
    return {"setting": "fsync", "history": history, "samples": samples, "faults": [], "final": final}


def only(report, promise, allowed=False):
    """The one promise with findings, and how many."""
    found = {
        p: report.count(p, allowed=allowed)
        for p in report.found
        if report.count(p, allowed=allowed)
    }
    return found


class Checker(unittest.TestCase):
    def test_a_clean_history_passes(self):
        report = check(clean())
        self.assertTrue(report.ok, render(report, [], 1, 1))
        self.assertEqual(report.stats["202s"], 3)

    def test_oversold_sampled_and_at_the_end(self):
        run = clean()
        run["samples"].append({"t": 5.0, "kind": "live", "live": {"1": 3}})
        self.assertEqual(only(check(run), "oversold"), {"oversold": 1})
        run = clean()
        run["final"]["orders"].append({"id": 4, "user": 14, "product": 1, "reservation": "r-4", "status": "paid"})
        run["history"].append({"t": 21.0, "d": 0.01, "op": "reserve", "u": 14, "p": 1, "s": 202, "r": "r-4"})
        run["history"].append({"t": 60.0, "op": "me", "u": 14, "p": 1, "s": 200, "st": "paid", "r": "r-4", "final": True})
        found = only(check(run), "oversold")
        self.assertEqual(found["oversold"], 1)

    def test_a_202_without_an_order_is_lost_unless_the_setting_allows_its_fault(self):
        run = clean()
        run["final"]["orders"].pop()  # user 12's order never came
        run["final"]["products"]["1"]["remaining"] = 1  # and its unit is back (not stranded)
        run["history"][-1] = {"t": 60.0, "op": "me", "u": 12, "p": 1, "s": 404, "code": "no_reservation", "final": True}
        self.assertEqual(only(check(run), "lost"), {"lost": 1})
        # The same after a failover: fsync may lose it, replicas:1 may not.
        run["faults"] = [{"t0": 20.5, "t1": 25.0, "kind": "promoted", "target": "7101"}]
        report = check(run)
        self.assertTrue(report.ok, render(report, run["faults"], 1, 1))
        self.assertEqual(only(report, "lost", allowed=True), {"lost": 1})
        run["setting"] = "replicas:1"
        self.assertEqual(only(check(run), "lost"), {"lost": 1})
        # A failover before the win cannot have lost it.
        run["setting"] = "fsync"
        run["faults"][0]["t0"] = 5.0
        self.assertEqual(only(check(run), "lost"), {"lost": 1})

    def test_a_rejected_win_is_a_definite_outcome_and_a_pending_one_is_lost_and_stuck(self):
        run = clean()
        run["final"]["orders"].pop()
        run["final"]["products"]["1"]["remaining"] = 1
        run["history"][-1] = {"t": 60.0, "op": "me", "u": 12, "p": 1, "s": 200, "st": "rejected", "r": R3, "final": True}
        self.assertTrue(check(run).ok)
        run["history"][-1] = {"t": 60.0, "op": "me", "u": 12, "p": 1, "s": 200, "st": "pending", "r": R3, "final": True}
        run["faults"] = [{"t0": 21.0, "t1": 22.0, "kind": "promoted", "target": "7101"}]
        self.assertEqual(only(check(run), "lost"), {"lost": 1, "stuck": 1})

    def test_duplicated_orders(self):
        run = clean()
        run["final"]["orders"][1]["user"] = 10  # two orders for user 10
        report = check(run)
        self.assertEqual(report.count("duplicated"), 1)
        run = clean()
        run["final"]["orders"][1]["reservation"] = R1  # two orders for one reservation
        self.assertEqual(check(run).count("duplicated"), 1)

    def test_phantom_orders_apart_from_those_whose_request_had_no_answer(self):
        run = clean()
        run["final"]["orders"].append({"id": 4, "user": 15, "product": 1, "reservation": "r-9", "status": "expired"})
        self.assertEqual(only(check(run), "phantom"), {"phantom": 1})
        run["history"].insert(0, {"t": 0.9, "d": 10.0, "op": "reserve", "u": 15, "p": 1, "s": None, "err": "timeout"})
        report = check(run)
        self.assertTrue(report.ok)
        self.assertEqual(only(report, "phantom", allowed=True), {"phantom": 1})

    def test_stranded_units_and_a_unit_returned_twice(self):
        run = clean()
        run["final"]["products"]["1"]["remaining"] = 1  # one too many on sale
        found = check(run).found["stranded"]["violations"]
        self.assertEqual([v["why"] for v in found], ["a unit returned twice"])
        run["final"]["products"]["1"]["stock"] = 4  # one unit nowhere
        run["final"]["products"]["1"]["remaining"] = 1
        found = check(run).found["stranded"]["violations"]
        self.assertEqual([v["why"] for v in found], ["a unit neither sold nor on sale"])

    def test_a_unit_redis_forgot_after_the_sale_ended_is_allowed_only_after_a_fault_that_loses_it(self):
        run = clean()
        run["final"]["products"]["1"]["stock"] = 3  # one unit neither sold nor on sale
        run["final"]["products"]["1"]["ends_t"] = 50.0
        self.assertEqual(only(check(run), "stranded"), {"stranded": 1})
        run["faults"] = [{"t0": 55.0, "t1": 56.0, "kind": "promoted", "target": "7301"}]
        report = check(run)
        self.assertTrue(report.ok, render(report, run["faults"], 1, 1))
        self.assertEqual(only(report, "stranded", allowed=True), {"stranded": 1})
        # While the sale was on, the fences must have caught it: a violation.
        run["faults"][0]["t0"] = 40.0
        self.assertEqual(only(check(run), "stranded"), {"stranded": 1})

    def test_a_stale_pending_entry_of_an_order_counts_once(self):
        run = clean()
        run["final"]["products"]["1"]["pending"] = 1
        run["final"]["products"]["1"]["pending_ids"] = [R3]  # R3 is an order already
        report = check(run)
        self.assertEqual(report.count("stranded"), 0)
        self.assertEqual(report.count("stuck"), 1)

    def test_stuck_reservations_and_messages(self):
        run = clean()
        run["final"]["dlq"] = 2
        self.assertEqual(only(check(run), "stuck"), {"stuck": 1})
        run = clean()
        run["final"]["products"]["1"]["pending"] = 1
        run["final"]["products"]["1"]["remaining"] = -1 + 0  # keep the count whole: -1 + 1 + 2 = 2
        found = only(check(run), "stuck")
        self.assertEqual(found.get("stuck"), 1)

    def test_sold_out_while_units_were_free_beyond_the_bound(self):
        run = clean()
        run["samples"] += [
            {"t": 40.0, "kind": "remaining", "remaining": {"1": 1}},
            {"t": 41.0, "kind": "remaining", "remaining": {"1": 1}},
            {"t": 42.0, "kind": "remaining", "remaining": {"1": 1}},
            {"t": 43.0, "kind": "remaining", "remaining": {"1": 1}},
        ]
        run["history"].append({"t": 42.5, "d": 0.01, "op": "reserve", "u": 16, "p": 1, "s": 410, "code": "sold_out"})
        self.assertEqual(only(check(run), "contradiction"), {"contradiction": 1})
        # Within the bound after a unit came back: allowed (the memory clears by message).
        run["history"][-1]["t"] = 40.2
        self.assertTrue(check(run).ok)

    def test_free_units_a_rebuild_took_back_without_a_win_are_not_free(self):
        # Seed 21 (fsync): a promoted replica that lagged counted 6 units free that had been
        # won; a second later the state was rebuilt (0 free, no win in between), and the 410s
        # 2.1 s after the first reading were the truth.
        run = clean()
        run["samples"] += [
            {"t": 40.0, "kind": "remaining", "remaining": {"1": 2}},
            {"t": 41.0, "kind": "remaining", "remaining": {"1": 0}},
        ]
        run["history"].append({"t": 42.1, "d": 0.01, "op": "reserve", "u": 16, "p": 1, "s": 410, "code": "sold_out"})
        self.assertTrue(check(run).ok, render(check(run), [], 1, 1))
        # Still free at the later reading: the 410 contradicts it.
        run["samples"][-1]["remaining"]["1"] = 2
        self.assertEqual(only(check(run), "contradiction"), {"contradiction": 1})

    def test_sold_out_right_after_its_serve_was_paused_is_within_the_bound(self):
        run = clean()
        run["samples"] += [{"t": 40.0, "kind": "remaining", "remaining": {"1": 3}}]
        run["history"].append({"t": 45.0, "d": 0.01, "op": "reserve", "u": 16, "p": 1, "s": 410, "code": "sold_out", "port": 8001})
        self.assertEqual(only(check(run), "contradiction"), {"contradiction": 1})
        # Its serve was frozen from 39 to 44.9: it ran 0.1 s since the units came back.
        run["faults"].append({"t0": 39.0, "t1": 44.9, "kind": "pause", "target": "serve-1", "port": 8001})
        self.assertTrue(check(run).ok)
        # The other serve's pause excuses nothing.
        run["faults"][-1]["port"] = 8002
        self.assertEqual(only(check(run), "contradiction"), {"contradiction": 1})

    def test_a_request_a_paused_serve_held_may_win_when_it_resumes(self):
        run = clean()
        run["samples"] += [
            {"t": 40.0, "kind": "remaining", "remaining": {"1": 1}},
            {"t": 46.0, "kind": "remaining", "remaining": {"1": 0}},
        ]
        # Its client gave up at 35 s; the serve, paused from 34 to 44 s, decided it at 44 s.
        run["history"].append({"t": 30.0, "d": 5.0, "op": "reserve", "u": 17, "p": 1, "s": None, "err": "timeout", "port": 8001})
        run["history"].append({"t": 44.5, "d": 0.01, "op": "reserve", "u": 16, "p": 1, "s": 410, "code": "sold_out", "port": 8002})
        self.assertEqual(only(check(run), "contradiction"), {"contradiction": 1})
        run["faults"].append({"t0": 34.0, "t1": 44.0, "kind": "pause", "target": "serve-1", "port": 8001})
        self.assertEqual(only(check(run), "contradiction"), {})

    def test_me_regresses(self):
        run = clean()
        run["history"].insert(5, {"t": 4.0, "d": 0.01, "op": "me", "u": 10, "p": 1, "s": 404, "code": "no_reservation"})
        self.assertEqual(only(check(run), "contradiction"), {"contradiction": 1})
        run = clean()
        run["history"].insert(5, {"t": 4.0, "d": 0.01, "op": "sse", "u": 10, "p": 1, "s": 200, "st": "confirmed", "r": R1})
        self.assertEqual(only(check(run), "contradiction"), {"contradiction": 1})

    def test_a_5xx_other_than_503_is_a_violation(self):
        run = clean()
        run["history"].append({"t": 5.0, "d": 0.01, "op": "pay", "u": 10, "p": 1, "s": 500, "code": "internal"})
        self.assertEqual(only(check(run), "internal"), {"internal": 1})
        run["history"][-1].update(s=503, code="unavailable")
        self.assertTrue(check(run).ok)

    def test_the_report_names_every_fault_kind_and_the_verdict(self):
        run = clean()
        faults = [
            {"t0": 1.0, "t1": 3.0, "kind": "serve-kill", "target": "serve-1"},
            {"t0": 5.0, "t1": 6.0, "kind": "serve-kill", "target": "serve-2"},
        ]
        text = render(check(run), faults, 42, 2)
        self.assertIn("| serve-kill | 2 | 3.0 |", text)
        self.assertIn("verdict: ok", text)


if __name__ == "__main__":
    unittest.main()
