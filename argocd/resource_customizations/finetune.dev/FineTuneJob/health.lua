-- Argo CD health check of finetune.dev/FineTuneJob: Lua 5.1 as Argo CD's gopher-lua runs it, with
-- only the libraries Argo CD opens for a script from argocd-cm (base, table, package and os.time/date):
-- no string or math library, so it needs no resource.customizations.useOpenLibs.
--   1. Progressing  no status yet, or status.observedGeneration or a condition's observedGeneration
--                   is behind metadata.generation (the status is not about the applied spec yet)
--   2. Degraded     Failed=True
--   3. Healthy      Succeeded=True
--   4. Suspended    Suspended=True (spec.runPolicy.suspend)
--   5. Degraded     Stalled=True: nothing changes until someone acts (an invalid spec or a policy
--                   violation, Validated=False; a trainer that stopped reporting progress)
--   6. Progressing  everything else, with the Reconciling (else Running) condition's message and
--                   the progress, e.g. "step 150/600 (25%)"
-- Conditions are the truth; status.phase stands in only for a status without conditions.

local health = {status = "Progressing", message = "Waiting for the operator to pick up the job"}

local function findCondition(conditions, conditionType)
  for _, condition in ipairs(conditions) do
    if condition.type == conditionType then
      return condition
    end
  end
  return nil
end

local function messageOf(condition)
  if condition ~= nil and type(condition.message) == "string" and condition.message ~= "" then
    return condition.message
  end
  return nil
end

-- Rounded to one decimal without math.floor: x % 1 is an operator, not a library function.
local function oneDecimal(x)
  local tenths = x * 10 + 0.5
  return (tenths - tenths % 1) / 10
end

local function progressText(status)
  local progress = status.progress
  if type(progress) ~= "table" or type(progress.percent) ~= "number" then
    return ""
  end
  -- The percent only: the operator's messages already name the step ("step 150/600").
  return " (" .. tostring(oneDecimal(progress.percent)) .. "%)"
end

local status = obj.status
if type(status) ~= "table" then
  return health
end
local conditions = status.conditions
if type(conditions) ~= "table" then
  conditions = {}
end

local generation = nil
if type(obj.metadata) == "table" and type(obj.metadata.generation) == "number" then
  generation = obj.metadata.generation
end
if generation ~= nil then
  if type(status.observedGeneration) == "number" and status.observedGeneration < generation then
    health.message = "Waiting for the operator to observe generation " .. tostring(generation)
    return health
  end
  for _, condition in ipairs(conditions) do
    if type(condition.observedGeneration) == "number" and condition.observedGeneration < generation then
      health.message = "Condition " .. tostring(condition.type) .. " describes generation " ..
        tostring(condition.observedGeneration) .. ", the spec is at generation " .. tostring(generation)
      return health
    end
  end
end

-- In this order: a failed run is Degraded even if another condition is also True.
local outcomes = {
  {condition = "Failed", health = "Degraded", message = "The fine-tuning run failed"},
  {condition = "Succeeded", health = "Healthy", message = "The fine-tuning run succeeded"},
  {condition = "Suspended", health = "Suspended", message = "The fine-tuning run is suspended"},
  {condition = "Stalled", health = "Degraded", message = "The fine-tuning job is stalled"},
}
for _, outcome in ipairs(outcomes) do
  local condition = findCondition(conditions, outcome.condition)
  local holds = condition ~= nil and condition.status == "True"
  -- Without conditions, the phase (named like the condition) stands in for them.
  if holds or (#conditions == 0 and status.phase == outcome.condition) then
    health.status = outcome.health
    if holds then
      health.message = messageOf(condition) or outcome.message
    else
      health.message = outcome.message
    end
    return health
  end
end

local message = messageOf(findCondition(conditions, "Reconciling")) or messageOf(findCondition(conditions, "Running"))
if message == nil and type(status.phase) == "string" and status.phase ~= "" then
  message = "Phase " .. status.phase
end
if message ~= nil then
  health.message = message .. progressText(status)
end
return health
