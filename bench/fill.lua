-- wrk script for the memory scenario: every request names a new URL (FILL_PATH?fill=N), so each one
-- is a miss that Strata stores, until L1 is full and evicting.
local n = 0
local path = os.getenv("FILL_PATH") or "/1k"
local run = os.getenv("FILL_RUN") or "0"

request = function()
    n = n + 1
    return wrk.format("GET", path .. "?fill=" .. run .. "-" .. n)
end
