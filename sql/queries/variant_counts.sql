-- SvS per round and origin: variational problems synthesized, valid (passed every screen; only the accuracy
-- band may have rejected them) and kept (valid and inside the band). origin 'offline': the synthesize stage,
-- whose kept variants join the next round's pool; 'online': written by the policy while training (method svs),
-- where a kept variant rewarded its synthesis.
SELECT round,
       origin,
       count(*) AS synthesized,
       count(*) FILTER (WHERE reject_reason IS NULL OR reject_reason = 'outside_band') AS valid,
       count(*) FILTER (WHERE kept) AS kept
FROM variants
GROUP BY round, origin
ORDER BY round, origin;
