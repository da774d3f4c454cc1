
ernie* 
textBYTES*Bÿþ not UTF-8