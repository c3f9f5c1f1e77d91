-- Argo CD health check of finetune.dev/FineTuneJob (Lua 5.1, as run by Argo CD's gopher-lua).
--   Healthy     the run succeeded (condition Succeeded=True)
--   Degraded    the run failed (condition Failed=True)
--   Suspended   runPolicy.suspend holds the run (condition Suspended=True)
--   Progressing everything else, and whenever the status describes an older generation of the
--               spec (status.observedGeneration or a condition's observedGeneration is behind
--               metadata.generation): what it says is not yet about the spec Argo CD applied.
-- Conditions are the truth; status.phase is only a fallback for a status without conditions.

local health = {status = "Progressing", message = "Waiting for the operator to pick up the job"}

local function conditionIsTrue(conditions, conditionType)
  for _, condition in ipairs(conditions) do
    if condition.type == conditionType and condition.status == "True" then
      return condition
    end
  end
  return nil
end

local function messageOf(condition, fallback)
  if condition ~= nil and condition.message ~= nil and condition.message ~= "" then
    return condition.message
  end
  return fallback
end

local function progressText(status)
  local progress = status.progress
  if progress == nil or progress.percent == nil then
    return ""
  end
  return string.format(" (%.1f%%, step %s of %s)", progress.percent, tostring(progress.step or "?"),
    tostring(progress.totalSteps or "?"))
end

if obj.status == nil then
  return health
end

local status = obj.status
local generation = nil
if obj.metadata ~= nil then
  generation = obj.metadata.generation
end
local conditions = status.conditions or {}

if generation ~= nil then
  if status.observedGeneration ~= nil and status.observedGeneration < generation then
    health.message = "Waiting for the operator to observe generation " .. tostring(generation)
    return health
  end
  for _, condition in ipairs(conditions) do
    if condition.observedGeneration ~= nil and condition.observedGeneration < generation then
      health.message = "Condition " .. tostring(condition.type) .. " describes generation " ..
        tostring(condition.observedGeneration) .. ", the spec is at generation " .. tostring(generation)
      return health
    end
  end
end

-- In order: a failed run is Degraded even if another condition is also True.
local outcomes = {
  {type = "Failed", health = "Degraded", message = "The fine-tuning run failed"},
  {type = "Succeeded", health = "Healthy", message = "The fine-tuning run succeeded"},
  {type = "Suspended", health = "Suspended", message = "The fine-tuning run is suspended"},
}

for _, outcome in ipairs(outcomes) do
  local condition = conditionIsTrue(conditions, outcome.type)
  -- Without conditions, the phase (named like the condition) stands in for them.
  if condition ~= nil or (#conditions == 0 and status.phase == outcome.type) then
    health.status = outcome.health
    health.message = messageOf(condition, outcome.message)
    return health
  end
end

local running = conditionIsTrue(conditions, "Running")
if running ~= nil then
  health.message = messageOf(running, "Training") .. progressText(status)
  return health
end

if status.phase ~= nil and status.phase ~= "" then
  health.message = "Phase " .. status.phase .. progressText(status)
end
return health
