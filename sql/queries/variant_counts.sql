-- SvS per round: variational problems synthesized, valid (passed every screen; only the accuracy band
-- may have rejected them) and kept (valid and inside the band).
SELECT round,
       count(*) AS synthesized,
       count(*) FILTER (WHERE reject_reason IS NULL OR reject_reason = 'outside_band') AS valid,
       count(*) FILTER (WHERE kept) AS kept
FROM variants
GROUP BY round
ORDER BY round;
