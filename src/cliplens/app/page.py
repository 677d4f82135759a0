"""The app's one page: the form, and a script that posts it, shows progress and places the
results (HTML rendered by the server from :mod:`cliplens.viz.pages`, so cards read as on
``cliplens explain`` pages). Word chips use the same hover/click script as those pages."""

from __future__ import annotations

import html

from ..methods import REGISTRY
from ..viz.html import _SCRIPT, _STYLE
from .core import FORM_OPTIONS, Service, public_methods
from .evaluation import DEFAULT_EVAL_METRICS, EVAL_METRICS, MAX_EVAL_SCENES

DEFAULT_METHODS = ("chefer", "legrad")

_APP_STYLE = """
form{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px 14px;display:flex;flex-wrap:wrap;gap:18px}
fieldset{border:1px solid #e3e3e3;border-radius:4px;min-width:14em} legend{font-weight:600;font-size:.9em}
textarea{width:24em;height:7em;font-family:monospace}
label{display:block;font-size:.9em;margin:2px 0} input[type=number]{width:6em}
#preview{max-width:140px;max-height:140px;display:block;margin-top:6px;border-radius:3px}
#error{color:#b42318;font-weight:600;margin:.6em 0;min-height:1.2em}
#status{margin:.4em 0;font-size:.9em} progress{width:18em;vertical-align:middle}
#viewbar{margin:.8em 0;display:none;gap:1.2em;align-items:center}
.card.gt{position:relative}
.card img.outline{position:absolute;top:8px;left:8px;width:calc(100% - 16px);pointer-events:none}
#results.no-outlines img.outline{display:none}
#results.stale{opacity:.35} #results.stale::before{content:'results of the previous run';font-weight:600}
.method{font-weight:700;font-size:.95em;margin-bottom:2px}
h2.prompt{border-top:1px solid #ddd;padding-top:.6em}
button{font-size:1em;padding:4px 14px}
#evalpanel{margin-top:2em;border-top:2px solid #ccc;padding-top:.6em}
#evalerror{color:#b42318;font-weight:600;min-height:1.2em}
table.evaltable{border-collapse:collapse;font-size:.9em;margin:.5em 0}
table.evaltable td,table.evaltable th{border:1px solid #ddd;padding:2px 8px;text-align:right}
table.evaltable td:first-child,table.evaltable th:first-child{text-align:left}
table.evaltable tr.baseline{color:#888}
img.evalchart{max-width:100%;display:block;margin:.5em 0}
"""

#: after html._SCRIPT in the same scope: no name here may repeat one of its (pic, ends, paint, show, back)
_APP_SCRIPT = """
const $=s=>document.querySelector(s);
let job=null;
function fail(msg){$('#error').textContent=msg;$('#status').textContent='';}
async function loadScene(){
  const seed=$('#scene').value;$('#error').textContent='';
  const r=await fetch('api/scenes/'+encodeURIComponent(seed));const j=await r.json();
  if(!r.ok){fail(j.error);return;}
  $('#preview').src='api/scenes/'+j.seed+'/image.png';$('#prompts').value=j.prompts.join('\\n');
  document.querySelector('input[name=source][value=scene]').checked=true;
}
function pickFile(){const f=$('#image').files[0];if(!f)return;
  document.querySelector('input[name=source][value=upload]').checked=true;$('#preview').src=URL.createObjectURL(f);}
async function submitRun(ev){
  ev.preventDefault();$('#error').textContent='';$('#viewbar').style.display='none';
  if($('#results').innerHTML)$('#results').classList.add('stale');
  const fd=new FormData($('#form'));
  if(fd.get('source')!=='upload')fd.delete('image');
  $('#run').disabled=true;$('#status').textContent='sending…';
  try{
    const r=await fetch('api/run',{method:'POST',body:fd});let j;
    try{j=await r.json();}catch(e){j={error:'the server answered '+r.status};}
    if(!r.ok){fail(j.error);return;}
    job=j.job;await poll();
  }catch(e){fail('cannot reach the app: '+e);}
  finally{$('#run').disabled=false;}
}
async function poll(){
  for(;;){
    const r=await fetch('api/jobs/'+job);const j=await r.json();
    if(!r.ok){fail(j.error);return;}
    if(j.status==='error'){fail(j.error);return;}
    const bar=`<progress max='${j.total}' value='${j.done}'></progress> `;
    if(j.status==='done'){$('#status').innerHTML=bar+'done';await showResults();return;}
    $('#status').innerHTML=bar+(j.status==='queued'?'waiting for another run to finish':
      `${j.done}/${j.total} methods · running ${j.current}`);
    await new Promise(res=>setTimeout(res,250));
  }
}
async function showResults(){
  const r=await fetch('api/jobs/'+job+'/view?mode='+$('#mode').value);
  if(!r.ok){let j={};try{j=await r.json();}catch(e){}fail(j.error||('the server answered '+r.status));return;}
  $('#results').innerHTML=await r.text();$('#results').classList.remove('stale');
  $('#download').href='api/jobs/'+job+'/download';$('#viewbar').style.display='flex';
}
function outlines(){$('#results').classList.toggle('no-outlines',!$('#outlines').checked);}
document.addEventListener('DOMContentLoaded',()=>{$('#form').addEventListener('submit',submitRun);
  $('#loadscene').addEventListener('click',loadScene);$('#image').addEventListener('change',pickFile);
  $('#mode').addEventListener('change',()=>{if(job)showResults();});$('#outlines').addEventListener('change',outlines);
  loadScene();
  $('#evalform').addEventListener('submit',startEval);$('#evalcancel').addEventListener('click',cancelEval);});
let ev=null,evShown=-1;
function evalFail(msg){$('#evalerror').textContent=msg;}
async function startEval(e){
  e.preventDefault();$('#evalerror').textContent='';evShown=-1;
  if(!document.querySelector('#evalform input[name=metrics]:checked')){evalFail('choose at least one metric');return;}
  const fd=new URLSearchParams();fd.append('n',$('#evaln').value);
  document.querySelectorAll('#evalform input[name=eval_methods]:checked').forEach(b=>fd.append('methods',b.value));
  document.querySelectorAll('#evalform input[name=metrics]:checked').forEach(b=>fd.append('metrics',b.value));
  $('#evalrun').disabled=true;
  try{
    const r=await fetch('api/evals',{method:'POST',body:fd});let j;
    try{j=await r.json();}catch(x){j={error:'the server answered '+r.status};}
    if(!r.ok){evalFail(j.error);$('#evalrun').disabled=false;return;}
    ev=j.eval;$('#evalcancel').disabled=false;$('#evalresults').innerHTML='';await pollEval();
  }catch(x){evalFail('cannot reach the app: '+x);}
  finally{$('#evalrun').disabled=false;$('#evalcancel').disabled=true;}
}
async function cancelEval(){if(!ev)return;$('#evalcancel').disabled=true;
  await fetch('api/evals/'+ev+'/cancel',{method:'POST'});}
async function pollEval(){
  for(;;){
    const r=await fetch('api/evals/'+ev);const j=await r.json();
    if(!r.ok){evalFail(j.error);return;}
    const bar=`<progress id='evalbar' max='${j.total}' value='${j.done}'></progress> ${j.done}/${j.total} scenes `;
    const what={queued:'waiting for an explain run to finish',running:'running',done:'done',
      cancelled:'cancelled',error:'failed'}[j.status]||j.status;
    $('#evalstatus').innerHTML=bar+`· <span id='evalstate'>${what}</span> · ${j.seconds}s`;
    if(j.version!==evShown){const v=await fetch('api/evals/'+ev+'/view');
      if(v.ok){$('#evalresults').innerHTML=await v.text();evShown=j.version;}}
    if(j.status==='error'){evalFail(j.error);return;}
    if(j.status==='done'||j.status==='cancelled')return;
    await new Promise(res=>setTimeout(res,400));
  }
}
"""


def index_html(service: Service) -> str:
    lim = service.limits
    offered = public_methods(service.adapter)
    methods = "".join(
        f"<label title='{html.escape(REGISTRY[m].summary)}'><input type='checkbox' name='methods' value='{m}'"
        f"{' checked' if m in DEFAULT_METHODS else ''}> {m}</label>"
        for m in offered
    )
    eval_methods = "".join(  # not name='methods': that picks the explain form's boxes
        f"<label title='{html.escape(REGISTRY[m].summary)}'><input type='checkbox' name='eval_methods' value='{m}'"
        f"{' checked' if m in DEFAULT_METHODS else ''}> {m}</label>"
        for m in offered
    )
    eval_metrics = "".join(
        f"<label><input type='checkbox' name='metrics' value='{m}'"
        f"{' checked' if m in DEFAULT_EVAL_METRICS else ''}> {m}</label>"
        for m in EVAL_METRICS
    )
    takes = {
        opt: ", ".join(m for m in offered if opt in REGISTRY[m].options) for opt in FORM_OPTIONS
    }
    return f"""<!doctype html><html><head><meta charset='utf-8'><title>cliplens app</title>
<style>{_STYLE}{_APP_STYLE}</style></head><body>
<h1>cliplens: why does <span class='num'>{html.escape(service.adapter.name)}</span> match this image with this text?</h1>
<form id='form'>
<fieldset><legend>image</legend>
 <label><input type='radio' name='source' value='scene' checked> demo scene (shapes world)
  <input type='number' id='scene' name='scene' value='1' min='0' max='{lim.max_scene_seed}'>
  <button type='button' id='loadscene'>load</button></label>
 <label><input type='radio' name='source' value='upload'> upload
  <input type='file' id='image' name='image' accept='image/*'></label>
 <img id='preview' alt=''>
 <div class='note'>at most {lim.max_upload_bytes // 2**20} MiB and {lim.max_pixels:,} pixels</div>
</fieldset>
<fieldset><legend>prompts, one a line</legend>
 <textarea id='prompts' name='prompts'></textarea>
 <div class='note'>at most {lim.max_prompts} prompts of {lim.max_prompt_chars} characters</div>
</fieldset>
<fieldset><legend>methods</legend>{methods}</fieldset>
<fieldset><legend>options</legend>
 <label>target <select id='target' name='target'><option value='logit'>logit</option>
  <option value='probability'>probability</option><option value='contrast'>contrast with…</option></select></label>
 <label>contrast: other prompt (text or number) <input type='text' id='contrast' name='contrast' size='14'></label>
 <label title='used by {takes["start_layer"]}'>start layer <input type='text' id='start_layer' name='start_layer' size='4' placeholder='default'></label>
 <label title='used by {takes["layers"]}'>layers (last K) <input type='text' id='layers' name='layers' size='4' placeholder='default'></label>
 <div class='note'>start layer: {takes["start_layer"]}; layers: {takes["layers"]}</div>
 <p><button id='run' type='submit'>explain</button></p>
</fieldset>
</form>
<div id='error' role='alert'></div><div id='status'></div>
<div id='viewbar'>
 <label>view <select id='mode'><option value='minmax'>normalised per map (min-max)</option>
  <option value='signed'>signed, centred on 0</option><option value='positive'>positive part</option></select></label>
 <label><input type='checkbox' id='outlines' checked> object outlines</label>
 <a id='download' href='#'>download results (zip: index.html, results.json, overlays per method)</a>
</div>
<div id='results'></div>
<section id='evalpanel'><h2>Evaluate the methods on N shapes-world scenes</h2>
<form id='evalform' novalidate>
<fieldset><legend>scenes</legend>
 <label>N <input type='number' id='evaln' name='n' value='3' min='1' max='{MAX_EVAL_SCENES}'></label>
 <div class='note'>1 to {MAX_EVAL_SCENES}, drawn as <code>cliplens evaluate --make-shapes N</code> does</div>
</fieldset>
<fieldset><legend>methods</legend>{eval_methods}</fieldset>
<fieldset><legend>metrics</legend>{eval_metrics}</fieldset>
<fieldset><legend>run</legend>
 <p><button id='evalrun' type='submit'>evaluate</button> <button id='evalcancel' type='button' disabled>cancel</button></p>
 <div class='note'>baselines (random, centre, oracle) are always scored</div>
</fieldset>
</form>
<div id='evalerror' role='alert'></div><div id='evalstatus'></div>
<div id='evalresults'></div>
</section>
<script>{_SCRIPT}{_APP_SCRIPT}</script>
</body></html>"""
