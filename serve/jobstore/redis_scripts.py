"""The Lua scripts of :class:`serve.jobstore.redis.RedisJobStore`: the steps that must be atomic and
that MULTI cannot express (a conditional write), each one script so Redis runs it as a unit."""

#: KEYS[1] = a tenant's queued zset, KEYS[2] = the queued-tenants set, ARGV[1] = the tenant.
_SREM_IF_EMPTY = """
if redis.call('ZCARD', KEYS[1]) == 0 then
    return redis.call('SREM', KEYS[2], ARGV[1])
end
return 0
"""

#: KEYS[1] = an idempotency hash, ARGV[1] = the key, ARGV[2] = the job id it must still point to.
_HDEL_IF_EQUAL = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
    return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""


#: KEYS[1] = a token bucket hash; ARGV = now (epoch s), rate (tokens/s), burst. Returns the wait in
#: seconds as a string ("0" = a token was taken): a Lua number returned to Redis would be truncated
#: to an integer. The same arithmetic as ``serve.jobstore.buckets.refill``, atomic because it is one
#: script.
_TAKE_TOKEN = """
local now = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then
    tokens = burst
    ts = now
end
local elapsed = now - ts
if elapsed < 0 then elapsed = 0 end
tokens = math.min(burst, tokens + elapsed * rate)
if now > ts then ts = now end
local wait = 0
if tokens >= 1 - 1e-9 then
    tokens = math.max(0, tokens - 1)
else
    wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'ts', string.format('%.17g', ts))
redis.call('PEXPIRE', KEYS[1], math.min(math.ceil(burst / rate * 1000) + 60000, 2592000000))
return string.format('%.17g', wait)
"""


#: KEYS[1] = a cluster lease; ARGV = owner, ttl in ms. 1 if the owner holds it afterwards.
_HOLD_LEASE = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    return 1
end
return 0
"""
